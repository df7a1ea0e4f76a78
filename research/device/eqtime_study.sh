# the equal-wall-clock study, GPT-2 small on the offline corpus: dense, Pixelfly, Pixelfly then dense, one call
set -o pipefail
source research/device/setup.sh
mkdir -p /tmp/corpus && for f in train validation; do xz -dc .corpus_xz/$f.txt.xz > /tmp/corpus/$f.txt; done
ls -la /tmp/corpus
MIN=${MIN:-1.9}
timeout 545 python3 benchmarks/quality_equal_time.py --minutes $MIN --out /tmp/eqtime --eval_steps 100 \
  --train_file /tmp/corpus/train.txt --validation_file /tmp/corpus/validation.txt --max_eval_samples 64 \
  --model_size small --per_device_train_batch_size 16 --per_device_eval_batch_size 16 --preprocessing_num_workers 16 \
  2>&1 | grep -v "it/s\]\|s/it\]" | tee $OUT/eqtime.log | tail -60
for f in summary.json loss.png dense_log.jsonl pixelfly_log.jsonl pixelfly-then-dense_log.jsonl \
         dense_results.json pixelfly_results.json; do cp /tmp/eqtime/$f $OUT/ 2>/dev/null; done
ls /tmp/eqtime
