# benchmarks/gpu_check.py in one device call: writes $OUT/gpu_check.json and $OUT/gpu_check_logs.tar.gz.
# Carry .whl (datasets, evaluate, dill, multiprocess wheels) and .gpu_assets/minilm (MiniLM's config and tokenizer
# files, no weights: the device gets a random-init copy, enough to check the GPU path). Set PIXELFLY_COMMIT to the
# commit the tree holds (the copy has no .git).
set -o pipefail
source research/device/setup.sh
python3 - <<'PY' || exit 1
import shutil, torch
from transformers import BertConfig, BertForSequenceClassification
torch.manual_seed(0)
BertForSequenceClassification(BertConfig.from_pretrained(".gpu_assets/minilm")).save_pretrained("/tmp/minilm")
for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    shutil.copy(f".gpu_assets/minilm/{name}", "/tmp/minilm")
PY
python3 benchmarks/gpu_check.py --bert_model /tmp/minilm --logs /tmp/gpu_check_logs --out $OUT/gpu_check.json "$@"
status=$?
tar czf $OUT/gpu_check_logs.tar.gz -C /tmp gpu_check_logs
exit $status
