"""Triton kernels for Pixelfly attention's static pattern: one softmax over the allowed keys, forward and backward.

The pattern (``butterfly_attention.pattern_allows``) is fixed per sequence length, so each query block's key blocks
(and each key block's query blocks, for dK/dV) come from small int32 tables built once, and only the causal
diagonal tile carries an element mask. Forward as FlashAttention-2 saving the log-sum-exp; backward as one kernel
for dK/dV per key tile over the transposed table and one for dQ per query tile, both recomputing P.

Work per program is uneven: the global key block is seen by every query block (31 blocks at S = 4096 against about
4 for the others), and bidirectionally the global query block sees every key block. Launched in block order, one
late heavy program leaves the GPU idle behind it, so the programs of such heavy blocks go first ("order" tables) and
the rest follow head by head, which keeps a head's blocks together in L2 (on an H200 at S = 4096: 10-14% less
forward+backward time than head by head alone, benchmarks/NOTES.md "A2").

Needs global tokens that fill whole blocks (``supports``); the optional key bias (0 or -inf per batch row and key)
carries padding masks. q, k, v: (B, H, S, D) with S a multiple of the pattern block; the output is written in
(B, S, H, D) memory order, the layout transformers' attention functions return, and the gradients in q's order where
that is dense (``_gradient_like``).
"""
from __future__ import annotations

import os
from functools import lru_cache
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .butterfly_attention import PatternSpec, pattern_allows
from .launch_cache import launch_tuned

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
LOG2E = 1.4426950408889634
HEAD_DIMS = (32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16)
MIN_BLOCK_SIZE = 128  # the GPU tiles are up to 128 rows and must divide a pattern block
# A block is heavy (launched first) when it lists more than HEAVY_FACTOR times the mean number of blocks; 0 makes every
# listed block heavy (all programs heaviest first), inf none (head by head in block order). A module setting so that
# benchmarks/probe_attention_kernel.py can compare the orders.
HEAVY_FACTOR = 2.0


@triton.jit
def _program(order_ptr, n_heavy, n_blocks, BH, SUBS: tl.constexpr):
    """(pattern block, sub-tile, batch*head) of this program. The order table lists the heavy blocks first: their
    programs go first, every head of a block before the next block; the other blocks follow head by head, so the
    programs running together share their head's K/V or Q/dO blocks in L2."""
    pid = tl.program_id(0)
    heavy_programs = n_heavy * SUBS * BH
    if pid < heavy_programs:
        bh = pid % BH
        tile = pid // BH
    else:
        light_tiles = (n_blocks - n_heavy) * SUBS
        bh = (pid - heavy_programs) // light_tiles
        tile = n_heavy * SUBS + (pid - heavy_programs) % light_tiles
    return tl.load(order_ptr + tile // SUBS), tile % SUBS, bh


@triton.jit
def _rows(ptr, offs, offs_d, stride_s, UPCAST: tl.constexpr):
    """The (len(offs), D) tile of rows offs of one head's slab; fp32 in the interpreter (numpy has no bf16)."""
    x = tl.load(ptr + offs[:, None] * stride_s + offs_d[None, :])
    return x.to(tl.float32) if UPCAST else x


@triton.jit
def _rows_t(ptr, offs, offs_d, stride_s, UPCAST: tl.constexpr):
    """The same tile transposed, (D, len(offs)), loaded as such."""
    x = tl.load(ptr + offs[None, :] * stride_s + offs_d[:, None])
    return x.to(tl.float32) if UPCAST else x


@triton.jit
def _attend_block(acc, m_i, l_i, q, k_ptr, v_ptr, bias_ptr, key0, offs_m, offs_d, stride_s, qk_scale,
                  MASK: tl.constexpr, HAS_BIAS: tl.constexpr, PATTERN_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
                  UPCAST: tl.constexpr):
    """Online softmax over one pattern block of keys, BLOCK_N at a time; MASK: the causal diagonal block."""
    for sub in tl.static_range(0, PATTERN_BLOCK, BLOCK_N):
        offs_n = key0 + sub + tl.arange(0, BLOCK_N)
        k = _rows_t(k_ptr, offs_n, offs_d, stride_s, UPCAST)
        v = _rows(v_ptr, offs_n, offs_d, stride_s, UPCAST)
        s = tl.dot(q, k) * qk_scale  # log2 units
        if HAS_BIAS:
            s += tl.load(bias_ptr + offs_n)[None, :]
        if MASK:
            s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if HAS_BIAS:
            # a row may have seen only masked keys so far: subtract 0 instead of -inf (no NaN)
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        # without a bias every row holds a finite maximum before its diagonal block: that block comes last, its
        # sub-blocks in order, and every query sees its own key
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attention_fwd(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, bias_ptr, rows_ptr, n_rows_ptr, order_ptr, n_heavy, qk_scale,
                   S, H, BH, width, stride_b, stride_h, stride_s, out_stride_b, out_stride_h, out_stride_s,
                   D: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, PATTERN_BLOCK: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    qb, sub, bh = _program(order_ptr, n_heavy, S // PATTERN_BLOCK, BH, PATTERN_BLOCK // BLOCK_M)
    b, h = bh // H, bh % H
    base = b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
    offs_m = qb * PATTERN_BLOCK + sub * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q = _rows(q_ptr + base, offs_m, offs_d, stride_s, UPCAST)
    if HAS_BIAS:
        bias_ptr += b.to(tl.int64) * S
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D), tl.float32)
    for i in range(tl.load(n_rows_ptr + qb)):  # whole blocks: no mask code in this loop
        key0 = tl.load(rows_ptr + qb * width + i) * PATTERN_BLOCK
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_ptr + base, v_ptr + base, bias_ptr, key0, offs_m, offs_d,
                                      stride_s, qk_scale, False, HAS_BIAS, PATTERN_BLOCK, BLOCK_N, UPCAST)
    if CAUSAL:
        acc, m_i, l_i = _attend_block(acc, m_i, l_i, q, k_ptr + base, v_ptr + base, bias_ptr, qb * PATTERN_BLOCK,
                                      offs_m, offs_d, stride_s, qk_scale, True, HAS_BIAS, PATTERN_BLOCK, BLOCK_N,
                                      UPCAST)
    lse = m_i + tl.math.log2(l_i)
    if HAS_BIAS:
        # rows with no allowed key: output 0 and an infinite LSE, so the backward's P is 0 there too
        lse = tl.where(l_i == 0.0, float("inf"), lse)
        l_i = tl.where(l_i == 0.0, 1.0, l_i)
    tl.store(lse_ptr + bh.to(tl.int64) * S + offs_m, lse)
    out_base = b.to(tl.int64) * out_stride_b + h.to(tl.int64) * out_stride_h
    tl.store(o_ptr + out_base + offs_m[:, None] * out_stride_s + offs_d[None, :],
             (acc / l_i[:, None]).to(o_ptr.dtype.element_ty))


@triton.jit
def _dkdv_block(dk, dv, k, v, key_bias, q_ptr, do_ptr, lse_ptr, delta_ptr, query0, offs_n, offs_d, stride_s,
                do_stride_s, qk_scale, MASK: tl.constexpr, HAS_BIAS: tl.constexpr, PATTERN_BLOCK: tl.constexpr,
                BLOCK_M: tl.constexpr, UPCAST: tl.constexpr):
    """dK and dV contributions of one pattern block of queries, BLOCK_M at a time (P recomputed from the LSE).
    Adding dQ here atomically instead of in a kernel of its own measured no faster (benchmarks/NOTES.md)."""
    for sub in tl.static_range(0, PATTERN_BLOCK, BLOCK_M):
        offs_m = query0 + sub + tl.arange(0, BLOCK_M)
        q_t = _rows_t(q_ptr, offs_m, offs_d, stride_s, UPCAST)
        do = _rows(do_ptr, offs_m, offs_d, do_stride_s, UPCAST)
        lse = tl.load(lse_ptr + offs_m)
        delta = tl.load(delta_ptr + offs_m)
        s_t = tl.dot(k, q_t) * qk_scale  # (BLOCK_N, BLOCK_M)
        if HAS_BIAS:
            s_t += key_bias[:, None]
        p_t = tl.math.exp2(s_t - lse[None, :])
        if MASK:
            p_t = tl.where(offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        ds_t = p_t * (tl.dot(v, tl.trans(do)) - delta[None, :])
        dk = tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), dk)
    return dk, dv


@triton.jit
def _attention_dkdv(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, bias_ptr, dk_ptr, dv_ptr, cols_ptr, n_cols_ptr,
                    order_ptr, n_heavy, qk_scale, scale, S, H, BH, width, stride_b, stride_h, stride_s,
                    do_stride_b, do_stride_h, do_stride_s, grad_stride_b, grad_stride_h, grad_stride_s,
                    D: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, PATTERN_BLOCK: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    kb, sub, bh = _program(order_ptr, n_heavy, S // PATTERN_BLOCK, BH, PATTERN_BLOCK // BLOCK_N)
    b, h = bh // H, bh % H
    base = b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
    do_base = b.to(tl.int64) * do_stride_b + h.to(tl.int64) * do_stride_h
    offs_n = kb * PATTERN_BLOCK + sub * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    k = _rows(k_ptr + base, offs_n, offs_d, stride_s, UPCAST)
    v = _rows(v_ptr + base, offs_n, offs_d, stride_s, UPCAST)
    key_bias = tl.load(bias_ptr + b.to(tl.int64) * S + offs_n) if HAS_BIAS else None
    dk = tl.zeros((BLOCK_N, D), tl.float32)
    dv = tl.zeros((BLOCK_N, D), tl.float32)
    lse_ptr += bh.to(tl.int64) * S
    delta_ptr += bh.to(tl.int64) * S
    for i in range(tl.load(n_cols_ptr + kb)):
        query0 = tl.load(cols_ptr + kb * width + i) * PATTERN_BLOCK
        dk, dv = _dkdv_block(dk, dv, k, v, key_bias, q_ptr + base, do_ptr + do_base, lse_ptr, delta_ptr, query0,
                             offs_n, offs_d, stride_s, do_stride_s, qk_scale, False, HAS_BIAS, PATTERN_BLOCK,
                             BLOCK_M, UPCAST)
    if CAUSAL:
        dk, dv = _dkdv_block(dk, dv, k, v, key_bias, q_ptr + base, do_ptr + do_base, lse_ptr, delta_ptr,
                             kb * PATTERN_BLOCK, offs_n, offs_d, stride_s, do_stride_s, qk_scale, True, HAS_BIAS,
                             PATTERN_BLOCK, BLOCK_M, UPCAST)
    out = (b.to(tl.int64) * grad_stride_b + h.to(tl.int64) * grad_stride_h + offs_n[:, None] * grad_stride_s
           + offs_d[None, :])
    tl.store(dk_ptr + out, (dk * scale).to(dk_ptr.dtype.element_ty))
    tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty))


@triton.jit
def _dq_block(dq, q, do, lse, delta, k_ptr, v_ptr, bias_ptr, key0, offs_m, offs_d, stride_s, qk_scale,
              MASK: tl.constexpr, HAS_BIAS: tl.constexpr, PATTERN_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
              UPCAST: tl.constexpr):
    """dQ contribution of one pattern block of keys, BLOCK_N at a time."""
    for sub in tl.static_range(0, PATTERN_BLOCK, BLOCK_N):
        offs_n = key0 + sub + tl.arange(0, BLOCK_N)
        k_t = _rows_t(k_ptr, offs_n, offs_d, stride_s, UPCAST)
        v_t = _rows_t(v_ptr, offs_n, offs_d, stride_s, UPCAST)
        s = tl.dot(q, k_t) * qk_scale
        if HAS_BIAS:
            s += tl.load(bias_ptr + offs_n)[None, :]
        p = tl.math.exp2(s - lse[:, None])
        if MASK:
            p = tl.where(offs_m[:, None] >= offs_n[None, :], p, 0.0)
        ds = p * (tl.dot(do, v_t) - delta[:, None])
        dq = tl.dot(ds.to(k_t.dtype), tl.trans(k_t), dq)
    return dq


@triton.jit
def _attention_dq(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, bias_ptr, dq_ptr, rows_ptr, n_rows_ptr, order_ptr,
                  n_heavy, qk_scale, scale, S, H, BH, width, stride_b, stride_h, stride_s,
                  do_stride_b, do_stride_h, do_stride_s, grad_stride_b, grad_stride_h, grad_stride_s, o_ptr,
                  out_stride_b, out_stride_h, out_stride_s,
                  D: tl.constexpr, CAUSAL: tl.constexpr, HAS_BIAS: tl.constexpr, PATTERN_BLOCK: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    qb, sub, bh = _program(order_ptr, n_heavy, S // PATTERN_BLOCK, BH, PATTERN_BLOCK // BLOCK_M)
    b, h = bh // H, bh % H
    base = b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h
    offs_m = qb * PATTERN_BLOCK + sub * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    q = _rows(q_ptr + base, offs_m, offs_d, stride_s, UPCAST)
    do = _rows(do_ptr + b.to(tl.int64) * do_stride_b + h.to(tl.int64) * do_stride_h, offs_m, offs_d, do_stride_s,
               UPCAST)
    lse = tl.load(lse_ptr + bh.to(tl.int64) * S + offs_m)
    # delta = rowsum(O * dO), the softmax backward's correction term, for these rows: stored for the dK/dV kernel,
    # which runs after this one (one launch less; on the H200 10 us less GPU time per step than its own kernel, A3)
    o = tl.load(o_ptr + b.to(tl.int64) * out_stride_b + h.to(tl.int64) * out_stride_h + offs_m[:, None] * out_stride_s
                + offs_d[None, :])
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + bh.to(tl.int64) * S + offs_m, delta)
    if HAS_BIAS:
        bias_ptr += b.to(tl.int64) * S
    dq = tl.zeros((BLOCK_M, D), tl.float32)
    for i in range(tl.load(n_rows_ptr + qb)):
        key0 = tl.load(rows_ptr + qb * width + i) * PATTERN_BLOCK
        dq = _dq_block(dq, q, do, lse, delta, k_ptr + base, v_ptr + base, bias_ptr, key0, offs_m, offs_d, stride_s,
                       qk_scale, False, HAS_BIAS, PATTERN_BLOCK, BLOCK_N, UPCAST)
    if CAUSAL:
        dq = _dq_block(dq, q, do, lse, delta, k_ptr + base, v_ptr + base, bias_ptr, qb * PATTERN_BLOCK, offs_m,
                       offs_d, stride_s, qk_scale, True, HAS_BIAS, PATTERN_BLOCK, BLOCK_N, UPCAST)
    tl.store(dq_ptr + b.to(tl.int64) * grad_stride_b + h.to(tl.int64) * grad_stride_h + offs_m[:, None] * grad_stride_s
             + offs_d[None, :], (dq * scale).to(dq_ptr.dtype.element_ty))


def _configs(tiles):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st) for bm, bn, w, st in tiles]


# configs from the session-6 probe (benchmarks/probe_attention_kernel.py); S keys the grid size, width the table
_KEY = ["S", "width", "n_heavy", "D", "CAUSAL", "HAS_BIAS", "PATTERN_BLOCK"]
_fwd_tuned = triton.autotune(_configs([(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2),
                                       (64, 64, 4, 4), (64, 128, 4, 3)]), key=_KEY)(_attention_fwd)
# (query rows per step, key rows per program) for dK/dV; (query rows per program, key rows per step) for dQ
_dkdv_tuned = triton.autotune(_configs([(32, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 3), (64, 64, 4, 3)]),
                              key=_KEY)(_attention_dkdv)
_dq_tuned = triton.autotune(_configs([(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 64, 4, 3)]),
                            key=_KEY)(_attention_dq)


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
    heavy_factor: see HEAVY_FACTOR."""
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
                         "a unit stride over the head dim; pass them through _same_layout (block_sparse_attention does)")


def _same_layout(q, k, v):
    """q, k, v as views sharing one (b, h, s) stride set with unit stride over the head dim (a copy only if not).
    Done once, before autograd saves them, so the backward reads the same tensors without copying again."""
    if k.stride() == q.stride() and v.stride() == q.stride() and q.stride(-1) == 1:
        return q, k, v
    return tuple(t.contiguous() for t in (q, k, v))


def _gradient_like(q, out):
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
                      config=None):
    """(out, lse): out (B, H, S, D) in (B, S, H, D) memory, lse (B * H, S) fp32 in log2 units. key_bias: (B, S) fp32,
    0 where a key may be seen and -inf where not, or None."""
    _check(q, k, v, spec)
    B, H, S, D = q.shape
    t = block_tables(S, spec, causal, q.device, HEAVY_FACTOR)
    out = torch.empty(B, S, H, D, device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty(B * H, S, device=q.device, dtype=torch.float32)
    meta = dict(D=D, CAUSAL=causal, HAS_BIAS=key_bias is not None, PATTERN_BLOCK=spec.block_size, UPCAST=INTERPRET)
    args = (q, k, v, out, lse, key_bias, t.rows, t.n_rows, t.row_order, t.row_heavy, scale * LOG2E, S, H, B * H,
            t.rows.shape[1], *q.stride()[:3], *out.stride()[:3])
    _launch(_attention_fwd, _fwd_tuned, _grid(S // spec.block_size, B * H, "BLOCK_M"), args, meta, spec.block_size,
            config)
    return out, lse


def attention_backward(q, k, v, out, lse, grad, key_bias, spec: PatternSpec, causal: bool, scale: float, config=None):
    """(dq, dk, dv), each (B, H, S, D), laid out as _gradient_like says; q, k, v as attention_forward took them."""
    B, H, S, D = q.shape
    if grad.stride(-1) != 1:
        grad = grad.contiguous()
    t = block_tables(S, spec, causal, q.device, HEAVY_FACTOR)
    delta = torch.empty_like(lse)
    dq, dk, dv = _gradient_like(q, out)
    meta = dict(D=D, CAUSAL=causal, HAS_BIAS=key_bias is not None, PATTERN_BLOCK=spec.block_size, UPCAST=INTERPRET)
    common = (scale * LOG2E, scale, S, H, B * H, t.rows.shape[1], *q.stride()[:3], *grad.stride()[:3],
              *dq.stride()[:3])
    n_blocks = S // spec.block_size
    _launch(_attention_dq, _dq_tuned, _grid(n_blocks, B * H, "BLOCK_M"),
            (q, k, v, grad, lse, delta, key_bias, dq, t.rows, t.n_rows, t.row_order, t.row_heavy, *common, out,
             *out.stride()[:3]),
            meta, spec.block_size, config)
    _launch(_attention_dkdv, _dkdv_tuned, _grid(n_blocks, B * H, "BLOCK_N"),
            (q, k, v, grad, lse, delta, key_bias, dk, dv, t.cols, t.n_cols, t.col_order, t.col_heavy, *common),
            meta, spec.block_size, config)
    return dq, dk, dv


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
    return _gradient_like(q, out)


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
    """The op's forward and backward without the custom-op dispatch, for eager calls, as the linear layers do since
    v15 (benchmarks/NOTES.md): the dispatch and its generated backward node are host time per call. Not measured
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
    q, k, v = _same_layout(q, k, v)
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
