"""Pixelfly attention on the Triton kernels as torch custom ops with autograd, and `block_sparse_attention`, the
function the registered attention calls (eager: an autograd.Function over the launchers, attention_launch.py;
under torch.compile: the custom ops).
"""
from __future__ import annotations

from typing import Optional

import torch

from .attention_launch import attention_backward, attention_forward, gradient_like, same_layout
from .butterfly_attention import PatternSpec


# The kernels as torch custom ops: torch.compile keeps them as opaque calls (no graph break), and their autograd
# formula is the backward launcher. The pattern travels as plain ints (butterfly_size 0 = no period).
@torch.library.custom_op("pixelfly::block_sparse_attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_bias: Optional[torch.Tensor], causal: bool,
                  scale: float, block_size: int, butterfly_size: int, n_factors: int,
                  n_global: int) -> tuple[torch.Tensor, torch.Tensor]:
    spec = PatternSpec(block_size, butterfly_size or None, n_factors, n_global)
    return attention_forward(q, k, v, key_bias, spec, causal, scale)


@_attention_op.register_fake
def _(q, k, v, key_bias, causal, scale, block_size, butterfly_size, n_factors, n_global):
    B, H, S, D = q.shape
    return q.new_empty(B, S, H, D).transpose(1, 2), q.new_empty(B * H, S, dtype=torch.float32)


@torch.library.custom_op("pixelfly::block_sparse_attention_backward", mutates_args=())
def _attention_backward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                           grad: torch.Tensor, key_bias: Optional[torch.Tensor], causal: bool, scale: float,
                           block_size: int, butterfly_size: int, n_factors: int,
                           n_global: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    spec = PatternSpec(block_size, butterfly_size or None, n_factors, n_global)
    return attention_backward(q, k, v, out, lse, grad, key_bias, spec, causal, scale)


@_attention_backward_op.register_fake
def _(q, k, v, out, lse, grad, key_bias, causal, scale, block_size, butterfly_size, n_factors, n_global):
    return gradient_like(q, out)


def _setup_context(ctx, inputs, output):
    q, k, v, key_bias, *pattern = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, key_bias)
    ctx.pattern = pattern


def _backward(ctx, grad, _grad_lse):
    q, k, v, out, lse, key_bias = ctx.saved_tensors
    dq, dk, dv = _attention_backward_op(q, k, v, out, lse, grad, key_bias, *ctx.pattern)
    return dq, dk, dv, None, None, None, None, None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


class _DirectAttention(torch.autograd.Function):
    """The op's forward and backward without the custom-op dispatch, for eager calls, as the linear layers do
    (ops.py, docs/dev/optimisation-notes.md): the dispatch and its generated backward node are host time per call. Not measured
    apart for attention."""

    @staticmethod
    def forward(ctx, q, k, v, key_bias, causal, scale, block_size, butterfly_size, n_factors, n_global):
        spec = PatternSpec(block_size, butterfly_size or None, n_factors, n_global)
        out, lse = attention_forward(q, k, v, key_bias, spec, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse, key_bias)
        ctx.spec, ctx.causal, ctx.scale = spec, causal, scale
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, out, lse, key_bias = ctx.saved_tensors
        dq, dk, dv = attention_backward(q, k, v, out, lse, grad, key_bias, ctx.spec, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None, None, None, None, None, None


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: PatternSpec, causal: bool,
                           scale: float, key_keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Pixelfly attention on the Triton kernels: q, k, v (B, H, S, D) -> (B, H, S, D) in (B, S, H, D) memory.

    key_keep: optional (B, S) bool, False for keys no query may see (padding). S need not be a multiple of the
    block: the tail is zero-padded (its keys masked), and cut from the output."""
    B, H, S, D = q.shape
    pad = -S % spec.block_size
    if pad:
        q, k, v = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    q, k, v = same_layout(q, k, v)
    key_bias = None
    # causal rows never reach the padded keys, which come after every real query
    if key_keep is not None or (pad and not causal):
        if key_keep is None:
            key_keep = torch.ones(B, S, dtype=torch.bool, device=q.device)
        if key_keep.shape != (B, S) or key_keep.dtype != torch.bool:
            raise ValueError(f"key_keep of shape {tuple(key_keep.shape)} and dtype {key_keep.dtype}: pass a ({B}, {S}) "
                             "bool tensor, True where a key may be seen")
        keep = torch.nn.functional.pad(key_keep, (0, pad), value=False)
        key_bias = torch.zeros(keep.shape, dtype=torch.float32, device=q.device).masked_fill_(~keep, float("-inf"))
    args = (q, k, v, key_bias, causal, scale, spec.block_size, spec.butterfly_size or 0, spec.n_factors, spec.n_global)
    if torch.compiler.is_compiling():
        out, _ = _attention_op(*args)
    else:
        out = _DirectAttention.apply(*args)
    return out[:, :, :S] if pad else out
