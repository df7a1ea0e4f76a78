# sourced at the start of every device call: wheels and the package into /tmp/site
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
# datasets 5.x needs pyarrow >= 24: where the device's is older, the 4.x wheel in .whl/alt (with its httpx) instead
if ! PYTHONPATH=/tmp/site python3 -c "import datasets" 2>/dev/null && ls .whl/alt/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/alt/*.whl || exit 1
fi
PYTHONPATH=/tmp/site python3 -c "import datasets, pyarrow; print('datasets', datasets.__version__, 'pyarrow', pyarrow.__version__)"
if ! python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --target /tmp/site . > /tmp/install.log 2>&1; then
  tail -5 /tmp/install.log; echo "package install failed: using the source tree"
  ln -sfn "$PWD/kernels" /tmp/site/pixelfly_kernels; export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=/tmp/site
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers, accelerate; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
