"""pixelfly_kernels: butterfly-sparse matmul kernels (Triton) and their PyTorch reference, as torch ops; the Pixelfly
attention pattern with its FlexAttention path and Triton kernels.

Import the modules, not this package: it imports nothing, so the folder imported a second time under its own name
`kernels` (the repo root on sys.path, where transformers' probe for the Hub `kernels` library imports it) registers
no torch op twice.

  the pattern          butterfly_pattern.py (the flat block butterfly rule, for both below)
  butterfly products   reference.py (PyTorch) | butterfly_kernels.py (Triton) <- butterfly_configs.py, autotune.py
                       (parallel_compile.py) <- butterfly_launch.py <- ops.py (torch ops: butterfly_linear, ...)
  attention            butterfly_attention.py (pattern, FlexAttention) | attention_reference.py (PyTorch)
                       attention_kernels.py (Triton) <- attention_launch.py <- block_sparse_attention.py (torch ops)
  both launchers       launch_cache.py (repeat calls skip Triton's launch path)
"""
