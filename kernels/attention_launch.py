"""The launchers of the attention kernels (attention_kernels.py): block tables, input checks, autotuned launches on
the GPU and fixed tiles in the interpreter.

Needs global tokens that fill whole blocks (``supports``); the optional key bias (0 or -inf per batch row and key)
carries padding masks. q, k, v: (B, H, S, D) with S a multiple of the pattern block; the output is written in
(B, S, H, D) memory order, the layout transformers' attention functions return, and the gradients in q's order where
that is dense (``gradient_like``).
"""
from __future__ import annotations

import os
from functools import lru_cache
from typing import NamedTuple, Optional

import torch
import triton

from .attention_kernels import attention_dkdv_kernel, attention_dq_kernel, attention_fwd_kernel
from .butterfly_attention import PatternSpec, pattern_allows
from .launch_cache import launch_tuned

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.4426950408889634
HEAD_DIMS = (32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16)
MIN_BLOCK_SIZE = 128  # the GPU tiles are up to 128 rows and must divide a pattern block
# A block is heavy (its programs launched first) when it lists more than this many times the mean number of blocks;
# 0 makes every listed block heavy (all programs heaviest first), inf none (head by head in block order)
HEAVY_BLOCK_FACTOR = 2.0


def _configs(tiles):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in tiles]


# configs from research/probe_attention_kernel.py's sweep; S keys the grid size, width the table
_KEY = ["S", "width", "n_heavy", "D", "CAUSAL", "HAS_BIAS", "PATTERN_BLOCK"]
_fwd_tuned = triton.autotune(_configs([(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2),
                                       (64, 64, 4, 4), (64, 128, 4, 3)]), key=_KEY)(attention_fwd_kernel)
# (query rows per step, key rows per program) for dK/dV; (query rows per program, key rows per step) for dQ
_dkdv_tuned = triton.autotune(_configs([(32, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3)]),
                              key=_KEY)(attention_dkdv_kernel)
_dq_tuned = triton.autotune(_configs([(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 64, 4, 3)]),
                            key=_KEY)(attention_dq_kernel)


class BlockTables(NamedTuple):
    """Whole pattern blocks: per query block the key blocks it sees (rows), per key block the query blocks that see it
    (cols), each padded to one width, with counts, and for each direction the launch order (the heavy blocks first,
    heaviest first, then the others in block order) and the number of heavy blocks. The causal diagonal is not
    listed: the kernels mask it apart."""

    rows: torch.Tensor
    n_rows: torch.Tensor
    row_order: torch.Tensor
    row_heavy: int
    cols: torch.Tensor
    n_cols: torch.Tensor
    col_order: torch.Tensor
    col_heavy: int


def supports(spec: PatternSpec) -> bool:
    """Whether these kernels can run the pattern: its only partial tiles must be the causal diagonal's, so the global
    tokens must fill whole blocks."""
    return spec.n_global % spec.block_size == 0


def whole_blocks(n_blocks: int, spec: PatternSpec, causal: bool) -> torch.Tensor:
    """(n_blocks, n_blocks) bool: key block kb is wholly allowed for query block qb (the causal diagonal excluded).
    Exact at block granularity because the global tokens fill whole blocks (``supports``)."""
    if not supports(spec):
        raise ValueError(f"{spec}: {spec.n_global} global tokens do not fill whole {spec.block_size}-token blocks; "
                         "use low_rank as a multiple of block_size for the Triton kernels (FlexAttention runs the rest)")
    first = torch.arange(n_blocks) * spec.block_size
    whole = pattern_allows(first[:, None], first[None, :], spec, causal)
    if causal:
        whole &= ~torch.eye(n_blocks, dtype=torch.bool)
    return whole


@lru_cache(maxsize=64)
def block_tables(seq_len: int, spec: PatternSpec, causal: bool, device: torch.device,
                 heavy_factor: float) -> BlockTables:
    """The tables for a sequence of seq_len tokens (a multiple of the pattern block), built once per device;
    heavy_factor: see HEAVY_BLOCK_FACTOR."""
    if seq_len % spec.block_size:
        raise ValueError(f"seq_len={seq_len} is not a multiple of the pattern block {spec.block_size}; pad it first "
                         "(block_sparse_attention does)")
    whole = whole_blocks(seq_len // spec.block_size, spec, causal)
    width = max(1, int(whole.sum(1).max()), int(whole.sum(0).max()))

    def table(m):
        counts = m.sum(1)
        entries = torch.zeros(m.shape[0], width, dtype=torch.int32)
        for i, row in enumerate(m):
            found = row.nonzero().flatten()
            entries[i, :len(found)] = found.to(torch.int32)
        heavy = counts > heavy_factor * counts.float().mean()
        by_count = torch.argsort(torch.where(heavy, counts, -1), descending=True, stable=True)
        order = torch.cat([by_count[:int(heavy.sum())], (~heavy).nonzero().flatten()]).to(torch.int32)
        return entries.to(device), counts.to(torch.int32).to(device), order.to(device), int(heavy.sum())

    return BlockTables(*table(whole), *table(whole.T))


def _check(q, k, v, spec):
    B, H, S, D = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} differ; the kernels "
                         "need equal (batch, heads, seq, head_dim) (repeat grouped K/V heads first)")
    if D not in HEAD_DIMS:
        raise ValueError(f"head_dim={D} is not one of {HEAD_DIMS} that the attention kernels are built for")
    if q.dtype not in DTYPES and not INTERPRET:
        raise ValueError(f"dtype {q.dtype} is not one of {DTYPES}; use bfloat16 or float16")
    if not INTERPRET and spec.block_size < MIN_BLOCK_SIZE:
        raise ValueError(f"block_size={spec.block_size} is below {MIN_BLOCK_SIZE}, the tile height of the GPU kernels")
    if k.stride() != q.stride() or v.stride() != q.stride() or q.stride(-1) != 1:
        raise ValueError(f"q, k, v strides {q.stride()}, {k.stride()}, {v.stride()}: the kernels need one stride set with "
                         "a unit stride over the head dim; pass them through same_layout (block_sparse_attention does)")


def same_layout(q, k, v):
    """q, k, v as views sharing one (b, h, s) stride set with unit stride over the head dim (a copy only if not).
    Done once, before autograd saves them, so the backward reads the same tensors without copying again."""
    if k.stride() == q.stride() and v.stride() == q.stride() and q.stride(-1) == 1:
        return q, k, v
    return tuple(t.contiguous() for t in (q, k, v))


def gradient_like(q, out):
    """dQ, dK, dV in q's memory order where q is (B, H, S, D) or (B, S, H, D) contiguous (a leaf, or a transposed
    projection: no copy when autograd hands them on), else in out's (B, S, H, D) order (transformers' split QKV
    views)."""
    like = q if q.is_contiguous() or q.transpose(1, 2).is_contiguous() else out
    return tuple(torch.empty_like(like) for _ in range(3))


def _grid(n_blocks, bh, tile):
    return lambda meta: (n_blocks * (meta["PATTERN_BLOCK"] // meta[tile]) * bh,)


def _launch(kernel, tuned, grid, args, meta, pattern_block, config):
    """Autotuned on the GPU; fixed tiles in the interpreter (it cannot time) or when given (tests)."""
    if config is None and not INTERPRET:
        launch_tuned(tuned, grid, args, meta)
        return
    bm, bn = config or (min(32, pattern_block),) * 2
    kernel[grid({**meta, "BLOCK_M": bm, "BLOCK_N": bn})](*args, **meta, BLOCK_M=bm, BLOCK_N=bn)


def attention_forward(q, k, v, key_bias: Optional[torch.Tensor], spec: PatternSpec, causal: bool, scale: float,
                      config: Optional[tuple[int, int]] = None, heavy_factor: float = HEAVY_BLOCK_FACTOR):
    """(out, lse): out (B, H, S, D) in (B, S, H, D) memory, lse (B * H, S) fp32 in log2 units. key_bias: (B, S) fp32,
    0 where a key may be seen and -inf where not, or None. config: fixed (BLOCK_M, BLOCK_N) tiles instead of the
    autotuner; heavy_factor: the launch order (HEAVY_BLOCK_FACTOR), the same in the backward."""
    _check(q, k, v, spec)
    B, H, S, D = q.shape
    t = block_tables(S, spec, causal, q.device, heavy_factor)
    out = torch.empty(B, S, H, D, device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty(B * H, S, device=q.device, dtype=torch.float32)
    meta = dict(D=D, CAUSAL=causal, HAS_BIAS=key_bias is not None, PATTERN_BLOCK=spec.block_size, UPCAST=INTERPRET)
    args = (q, k, v, out, lse, key_bias, t.rows, t.n_rows, t.row_order, t.row_heavy, scale * LOG2E, S, H, B * H,
            t.rows.shape[1], *q.stride()[:3], *out.stride()[:3])
    _launch(attention_fwd_kernel, _fwd_tuned, _grid(S // spec.block_size, B * H, "BLOCK_M"), args, meta, spec.block_size,
            config)
    return out, lse


def attention_backward(q, k, v, out, lse, grad, key_bias, spec: PatternSpec, causal: bool, scale: float,
                       config: Optional[tuple[int, int]] = None, heavy_factor: float = HEAVY_BLOCK_FACTOR):
    """(dq, dk, dv), each (B, H, S, D), laid out as gradient_like says; q, k, v as attention_forward took them."""
    B, H, S, D = q.shape
    if grad.stride(-1) != 1:
        grad = grad.contiguous()
    t = block_tables(S, spec, causal, q.device, heavy_factor)
    delta = torch.empty_like(lse)
    dq, dk, dv = gradient_like(q, out)
    meta = dict(D=D, CAUSAL=causal, HAS_BIAS=key_bias is not None, PATTERN_BLOCK=spec.block_size, UPCAST=INTERPRET)
    common = (scale * LOG2E, scale, S, H, B * H, t.rows.shape[1], *q.stride()[:3], *grad.stride()[:3],
              *dq.stride()[:3])
    n_blocks = S // spec.block_size
    _launch(attention_dq_kernel, _dq_tuned, _grid(n_blocks, B * H, "BLOCK_M"),
            (q, k, v, grad, lse, delta, key_bias, dq, t.rows, t.n_rows, t.row_order, t.row_heavy, *common, out,
             *out.stride()[:3]),
            meta, spec.block_size, config)
    _launch(attention_dkdv_kernel, _dkdv_tuned, _grid(n_blocks, B * H, "BLOCK_N"),
            (q, k, v, grad, lse, delta, key_bias, dk, dv, t.cols, t.n_cols, t.col_order, t.col_heavy, *common),
            meta, spec.block_size, config)
    return dq, dk, dv
