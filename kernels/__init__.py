"""pixelfly_kernels: butterfly-sparse matmul kernels (Triton) and their PyTorch reference, as torch ops."""
from .ops import BACKENDS, butterfly_mm, butterfly_mm_dw, butterfly_mm_dw_lowrank, butterfly_mm_t

__all__ = ["BACKENDS", "butterfly_mm", "butterfly_mm_t", "butterfly_mm_dw", "butterfly_mm_dw_lowrank"]
