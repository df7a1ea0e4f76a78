# GPU suite after the restructure, the import probe for the study, and the linear table as a same-numbers check
set -o pipefail
source research/device/setup.sh
python3 - <<'PY' 2>&1 | tee $OUT/probe.txt
import importlib
for name in ("pyarrow", "pandas", "fsspec", "yaml", "datasets", "pytest", "pixelfly_hf", "pixelfly_kernels"):
    try:
        m = importlib.import_module(name); print(name, getattr(m, "__version__", "?"), m.__file__)
    except Exception as e:
        print(name, "MISSING", type(e).__name__, e)
PY
timeout 240 python3 -m pytest -m gpu -q -p no:cacheprovider -x tests/test_butterfly_kernels.py tests/test_pixelfly_linear.py tests/test_attention.py tests/test_attention_kernels.py 2>&1 | tee $OUT/pytest_gpu.txt | tail -25
if python3 -c "import datasets" 2>/dev/null; then
  # the recipe's GPU default (--torch_compile auto: CUDA graphs) through evaluation and the switch to dense
  timeout 110 python3 -m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision bf16 \
    recipes/gpt2_wikitext.py --model_size tiny --seq_len 128 --max_train_steps 40 --eval_steps 20 --logging_steps 10 \
    --densify_at 0.5 --output_dir /tmp/smoke 2>&1 | tee $OUT/recipe_smoke.txt | grep -v "it/s\]" | tail -25
  cp /tmp/smoke/all_results.json $OUT/recipe_smoke_results.json 2>/dev/null
fi
