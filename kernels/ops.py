"""The butterfly products as torch custom ops (opaque to torch.compile, so no graph breaks) with autograd.

`backend` picks the implementation inside the op: "triton" (CUDA, or CPU under TRITON_INTERPRET=1) or
"reference" (plain PyTorch, any device).
"""
from typing import Optional

import torch

from . import reference

BACKENDS = ("triton", "reference")


def _impl(backend: str):
    if backend == "reference":
        return reference
    if backend == "triton":
        from . import butterfly_matmul  # imported lazily: importing Triton costs seconds

        return butterfly_matmul
    raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")


@torch.library.custom_op("pixelfly::butterfly_mm", mutates_args=())
def butterfly_mm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], backend: str) -> torch.Tensor:
    """Y = X @ S^T + bias for x (T, in) and weight tiles (B, F, q, p)."""
    return _impl(backend).butterfly_matmul(x, weight, bias)


@butterfly_mm.register_fake
def _(x, weight, bias, backend):
    B, _, q, _ = weight.shape
    return x.new_empty(x.shape[0], B * q)


@torch.library.custom_op("pixelfly::butterfly_mm_t", mutates_args=())
def butterfly_mm_t(grad: torch.Tensor, weight: torch.Tensor, backend: str) -> torch.Tensor:
    """dX = dY @ S for grad (T, out)."""
    return _impl(backend).butterfly_matmul_t(grad, weight)


@butterfly_mm_t.register_fake
def _(grad, weight, backend):
    B, _, _, p = weight.shape
    return grad.new_empty(grad.shape[0], B * p)


@torch.library.custom_op("pixelfly::butterfly_mm_dw", mutates_args=())
def butterfly_mm_dw(grad: torch.Tensor, x: torch.Tensor, n_slots: int, butterfly_size: int, backend: str) -> torch.Tensor:
    """dW (B, F, q, p) of Y = X @ S^T."""
    return _impl(backend).butterfly_matmul_dw(grad, x, n_slots, butterfly_size)


@butterfly_mm_dw.register_fake
def _(grad, x, n_slots, butterfly_size, backend):
    B = butterfly_size
    return x.new_empty(B, n_slots, grad.shape[1] // B, x.shape[1] // B)


def _setup_context(ctx, inputs, output):
    x, weight, bias, backend = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None
    ctx.backend = backend


def _backward(ctx, grad):
    x, weight = ctx.saved_tensors
    grad = grad.contiguous()
    dx = dw = dbias = None
    if ctx.needs_input_grad[0]:
        dx = butterfly_mm_t(grad, weight, ctx.backend)
    if ctx.needs_input_grad[1]:
        dw = butterfly_mm_dw(grad, x, weight.shape[1], weight.shape[0], ctx.backend).to(weight.dtype)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        dbias = grad.sum(0, dtype=torch.float32).to(grad.dtype)
    return dx, dw, dbias, None


butterfly_mm.register_autograd(_backward, setup_context=_setup_context)
