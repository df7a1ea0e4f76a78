"""The butterfly products as torch custom ops with autograd.

They are opaque custom ops: torch.compile (Inductor, CUDA graphs) keeps each as one call in its graph, with no graph
break, and runs it through the same launchers as eager code, so compiled and eager models use the same autotuned
kernels, tuning cache and launch cache. torch.compile only traces the fake implementations (shapes and dtypes), which
the CPU tests cover. Eager callers use `butterfly_linear`, which runs the same forward and backward through a plain
autograd.Function: the custom-op dispatch and its generated backward node cost more host time per call than the short
kernels run (docs/dev/optimisation-notes.md). `backend` picks the implementation: "triton" (CUDA, or CPU under
TRITON_INTERPRET=1) or "reference" (plain PyTorch, any device).
"""
from typing import Optional

import torch
from torch.library import custom_op

from . import butterfly_launch, reference

BACKENDS = ("triton", "reference")


def _impl(backend: str):
    if backend == "reference":
        return reference
    if backend == "triton":
        return butterfly_launch
    raise ValueError(f"backend={backend!r} is not one of {BACKENDS}")


@custom_op("pixelfly::butterfly_mm", mutates_args=())
def butterfly_mm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lowrank_u: Optional[torch.Tensor],
    lowrank_v: Optional[torch.Tensor],
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Y, Z): Y = X @ S^T + Z @ U^T + bias with Z = X @ V^T, for x (T, in), weight tiles (B, F, q, p),
    U (out, r), V (r, in). Z (T, r; empty without low rank) is returned so the backward reuses it instead
    of reading X again; it is differentiable like any output.

    The low-rank term rides in the sparse kernel as one extra K segment: only the skinny Z is a separate
    GEMM, and Y is written once.
    """
    return _forward(x, weight, bias, lowrank_u, lowrank_v, backend)


@butterfly_mm.register_fake
def _(x, weight, bias, lowrank_u, lowrank_v, backend):
    _impl(backend)
    B, F, q, p = weight.shape
    z = x.new_empty(x.shape[0], lowrank_v.shape[0]) if lowrank_v is not None else x.new_empty(0)
    return x.new_empty(x.shape[0], B * q), z


def _forward(x, weight, bias, lowrank_u, lowrank_v, backend):
    z = x @ lowrank_v.T if lowrank_v is not None else None
    y = _impl(backend).butterfly_matmul(x, weight, bias, z, lowrank_u)
    return y, z if z is not None else x.new_empty(0)


@custom_op("pixelfly::butterfly_mm_t", mutates_args=())
def butterfly_mm_t(
    grad: torch.Tensor, weight: torch.Tensor, dz: Optional[torch.Tensor], lowrank_v: Optional[torch.Tensor], backend: str
) -> torch.Tensor:
    """dX = dY @ S + dZ @ V for grad (T, out) and dZ = dY @ U (T, r)."""
    return _impl(backend).butterfly_matmul_t(grad, weight, dz, lowrank_v)


@butterfly_mm_t.register_fake
def _(grad, weight, dz, lowrank_v, backend):
    _impl(backend)
    B, F, q, p = weight.shape
    return grad.new_empty(grad.shape[0], B * p)


@custom_op("pixelfly::butterfly_mm_dw", mutates_args=())
def butterfly_mm_dw(grad: torch.Tensor, x: torch.Tensor, n_slots: int, butterfly_size: int, backend: str) -> torch.Tensor:
    """dW (B, F, q, p) of Y = X @ S^T, in x's dtype."""
    return _impl(backend).butterfly_matmul_dw(grad, x, n_slots, butterfly_size)


@butterfly_mm_dw.register_fake
def _(grad, x, n_slots, butterfly_size, backend):
    _impl(backend)
    return x.new_empty(butterfly_size, n_slots, grad.shape[1] // butterfly_size, x.shape[1] // butterfly_size)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lowrank_u, lowrank_v, backend = inputs
    ctx.save_for_backward(x, weight, lowrank_u, lowrank_v, output[1])
    ctx.has_bias = bias is not None
    ctx.backend = backend
    ctx.direct = False  # the backward calls the ops (what torch.compile traces), not the launchers


def _backward(ctx, grad, grad_z):
    x, weight, lowrank_u, lowrank_v, z = ctx.saved_tensors
    grad = grad.contiguous()
    needs = ctx.needs_input_grad
    lowrank = lowrank_u is not None
    dz = grad @ lowrank_u if lowrank and (needs[0] or needs[4]) else None
    if dz is not None and grad_z is not None:  # Z used outside the op too
        dz = dz + grad_z
    dx = dw = dbias = du = dv = None
    impl = _impl(ctx.backend)
    if needs[0]:
        dx = (impl.butterfly_matmul_t(grad, weight, dz, lowrank_v) if ctx.direct
              else butterfly_mm_t(grad, weight, dz, lowrank_v, ctx.backend))
    if needs[1]:
        dw = (impl.butterfly_matmul_dw(grad, x, weight.shape[1], weight.shape[0]) if ctx.direct
              else butterfly_mm_dw(grad, x, weight.shape[1], weight.shape[0], ctx.backend)).to(weight.dtype)
    if ctx.has_bias and needs[2]:
        dbias = grad.sum(0, dtype=torch.float32).to(grad.dtype)
    if lowrank and needs[3]:
        du = grad.T @ z
    if lowrank and needs[4]:
        dv = dz.T @ x
    return dx, dw, dbias, du, dv, None


butterfly_mm.register_autograd(_backward, setup_context=_setup_context)


class _DirectButterflyMM(torch.autograd.Function):
    """butterfly_mm's forward and backward without the custom-op dispatch (eager calls)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lowrank_u, lowrank_v, backend):
        out = _forward(x, weight, bias, lowrank_u, lowrank_v, backend)
        _setup_context(ctx, (x, weight, bias, lowrank_u, lowrank_v, backend), out)
        ctx.direct = True
        return out

    backward = staticmethod(_backward)


def butterfly_linear(x, weight, bias, lowrank_u, lowrank_v, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """butterfly_mm (same arguments and results): the op while torch.compile or torch.jit traces, the launchers
    through an autograd.Function otherwise."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return butterfly_mm(x, weight, bias, lowrank_u, lowrank_v, backend)
    return _DirectButterflyMM.apply(x, weight, bias, lowrank_u, lowrank_v, backend)
