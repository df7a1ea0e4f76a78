"""pixelfly_kernels: butterfly-sparse matmul kernels (Triton) and their PyTorch reference, as torch ops; the Pixelfly
attention pattern with its FlexAttention path and Triton kernels."""
import importlib.util
import sys

if __name__ != "pixelfly_kernels" and importlib.util.find_spec("pixelfly_kernels") is not None:
    # this folder imported under its own name, `kernels` (the repo root on sys.path: `python -c` or a REPL there;
    # transformers imports `kernels` while probing for the Hub kernels library): hand back the installed package
    # instead of running a second copy, whose op registrations would clash with the first (a crash in the op
    # dispatcher, seen in CI)
    import pixelfly_kernels

    sys.modules[__name__] = pixelfly_kernels
else:
    from .ops import BACKENDS, butterfly_linear, butterfly_mm, butterfly_mm_dw, butterfly_mm_t

    __all__ = ["BACKENDS", "butterfly_linear", "butterfly_mm", "butterfly_mm_t", "butterfly_mm_dw"]
