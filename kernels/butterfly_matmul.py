"""Triton kernels for the flat block butterfly product and its two gradients.

Weight layout (shared with reference.py): weight[r, j] is the (q x p) tile of W at tile row r and tile
column r ^ offset_j, offset_j = (1 << j) >> 1. The XOR is computed in the kernel: no look-up tables, no
densified weight.

  forward  Y[:, r]   = sum_j X[:, r ^ o_j]  @ weight[r, j]^T          (K = p per slot)
  dX       dX[:, c]  = sum_j dY[:, c ^ o_j] @ weight[c ^ o_j, j]      (same kernel, K = q; symmetric pattern)
  dW       dW[r, j]  = dY[:, r]^T @ X[:, r ^ o_j]                      (K = tokens)

Every output tile stays inside one output patch, so its K loop walks F contiguous slabs of the input.
Accumulation is fp32; inputs are fp32, fp16 or bf16. The autotuner chooses per shape between pointer loads and
TMA descriptor loads (Hopper's bulk tensor copies; only where the operands are 16-byte aligned), and for the
forward/dX kernel between one tile per program and a persistent program per SM; where a patch width is no power of
2 (160 = 128 + 32), also tiles that span the patch in two power-of-2 column parts. Every config compiles for sm_90
in CI without a GPU (tests/compile_sm90.py).
"""
import functools
import os
from concurrent.futures import ThreadPoolExecutor

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton
from triton.runtime import Autotuner
from triton.runtime._async_compile import AsyncCompileMode

from .launch_cache import launch_tuned

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _mm_tile(
    pid_m, pid_n, a_desc, w_desc,
    a_ptr, w_ptr, bias_ptr, z_ptr, l_ptr, out_ptr,
    M, N_PATCH, K_PATCH, RANK,
    stride_am, stride_om,
    stride_wr, stride_wj, stride_wn, stride_wk,
    stride_zm, stride_lk, stride_ln,
    F: tl.constexpr, PARTNER_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, RANK_BLOCK: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr, TAIL_K: tl.constexpr,
    FLAT_K: tl.constexpr, K_CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_TMA: tl.constexpr, REST_N: tl.constexpr,
    out_desc, STORE_BY_DESC: tl.constexpr,
):
    """One (BLOCK_M x BLOCK_N) output tile: pid_m picks the rows, pid_n the patch and the columns inside it.
    REST_N > 0: the tile spans the whole patch, BLOCK_N columns and then REST_N (a narrower power of 2) in a second
    accumulator, each A tile loaded once for both (160 = 128 + 32 instead of two 128-wide tiles, 96 columns wasted)."""
    tiles_per_patch = tl.cdiv(N_PATCH, BLOCK_N + REST_N)
    r = pid_n // tiles_per_patch  # output patch
    n0 = (pid_n % tiles_per_patch) * (BLOCK_N + REST_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N_PATCH
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if REST_N > 0:
        offs_n2 = n0 + BLOCK_N + tl.arange(0, REST_N)
        mask_n2 = offs_n2 < N_PATCH
        acc2 = tl.zeros((BLOCK_M, REST_N), dtype=tl.float32)
    if FLAT_K:
        # the F slots' K patches as one range of F * K_PATCH: a step may take the end of one slot and the start of the
        # next. Each K element finds its slot and offset by chunks of K_CHUNK (a power of 2 dividing the patch), which
        # keeps the loads contiguous runs: 16-byte vectors, asynchronous (pointer loads only)
        chunks = K_PATCH // K_CHUNK
        for k0 in range(0, F * K_PATCH, BLOCK_K):
            kv = k0 + offs_k
            chunk = kv // K_CHUNK
            j = chunk // chunks
            kk = (chunk - j * chunks) * K_CHUNK + kv % K_CHUNK
            partner = r ^ ((1 << j) >> 1)
            w_row = partner if PARTNER_WEIGHT else r
            mask_k = kv < F * K_PATCH
            w_k = w_ptr + (w_row * stride_wr + j * stride_wj + kk * stride_wk)[:, None]  # each K element's weight row
            a = tl.load(a_ptr + offs_m[:, None] * stride_am + (partner * K_PATCH + kk)[None, :],
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(w_k + offs_n[None, :] * stride_wn, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
            if REST_N > 0:
                w2 = tl.load(w_k + offs_n2[None, :] * stride_wn, mask=mask_k[:, None] & mask_n2[None, :], other=0.0)
                acc2 = tl.dot(a, w2.to(a.dtype), acc2, input_precision=DOT_PRECISION)
    else:
        # one flat loop over (slot j, k step) so the software pipeline runs across slot boundaries. TAIL_K > 0: BLOCK_K
        # does not divide the patch; the loop takes the whole steps unmasked and each slot's rest follows below
        k_steps = K_PATCH // BLOCK_K if TAIL_K > 0 else tl.cdiv(K_PATCH, BLOCK_K)
        a_rows = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :]
        w_cols = w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
        if REST_N > 0:
            w2_cols = w_ptr + offs_n2[None, :] * stride_wn + offs_k[:, None] * stride_wk
        for step in range(0, F * k_steps):
            j = step // k_steps
            k0 = (step - j * k_steps) * BLOCK_K
            partner = r ^ ((1 << j) >> 1)
            # forward reads weight[r, j] transposed; dX reads weight[partner, j] as stored
            w_row = partner if PARTNER_WEIGHT else r
            a_ptrs = a_rows + partner * K_PATCH + k0
            w_slot = w_row * stride_wr + j * stride_wj + k0 * stride_wk
            w_ptrs = w_cols + w_slot
            if USE_TMA:
                a = a_desc.load([pid_m * BLOCK_M, partner * K_PATCH + k0])
                if PARTNER_WEIGHT:
                    w = w_desc.load([(partner * F + j) * K_PATCH + k0, n0])
                else:
                    w = w_desc.load([(r * F + j) * N_PATCH + n0, k0]).T
            elif EVEN_K or TAIL_K > 0:
                a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
                w = tl.load(w_ptrs, mask=mask_n[None, :], other=0.0)
            else:
                mask_k = offs_k + k0 < K_PATCH
                a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
            if UPCAST:  # the interpreter computes bf16 wrongly; fp32 there is exact enough
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
            if REST_N > 0:  # the rest's weight columns by pointer loads, in TMA configs too (a narrow tile)
                if EVEN_K or TAIL_K > 0:
                    w2 = tl.load(w2_cols + w_slot, mask=mask_n2[None, :], other=0.0)
                else:
                    w2 = tl.load(w2_cols + w_slot, mask=(offs_k + k0 < K_PATCH)[:, None] & mask_n2[None, :], other=0.0)
                acc2 = tl.dot(a, w2.to(a.dtype), acc2, input_precision=DOT_PRECISION)
        if TAIL_K > 0:
            # the last TAIL_K (a power of 2, >= 16) columns of every slot: a narrow step of their own instead of a
            # full-width step masked to a fraction (80-wide patches: 64 + 16, not 2 x 64 with 48 of them masked)
            offs_t = k_steps * BLOCK_K + tl.arange(0, TAIL_K)
            for j in tl.static_range(F):
                partner = r ^ ((1 << j) >> 1)
                w_row = partner if PARTNER_WEIGHT else r
                w_t = w_ptr + w_row * stride_wr + j * stride_wj + offs_t[:, None] * stride_wk  # the tail's weight rows
                a = tl.load(a_ptr + offs_m[:, None] * stride_am + partner * K_PATCH + offs_t[None, :], mask=mask_m[:, None], other=0.0)
                w = tl.load(w_t + offs_n[None, :] * stride_wn, mask=mask_n[None, :], other=0.0)
                if UPCAST:
                    a = a.to(tl.float32)
                    w = w.to(tl.float32)
                acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
                if REST_N > 0:
                    w2 = tl.load(w_t + offs_n2[None, :] * stride_wn, mask=mask_n2[None, :], other=0.0)
                    acc2 = tl.dot(a, w2.to(a.dtype), acc2, input_precision=DOT_PRECISION)
    if RANK_BLOCK > 0:
        # the low-rank term as one more K segment: Z (M x rank) times the factor's columns of this patch
        offs_r = tl.arange(0, RANK_BLOCK)
        mask_r = offs_r < RANK
        z = tl.load(z_ptr + offs_m[:, None] * stride_zm + offs_r[None, :], mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        cols = r * N_PATCH + offs_n
        lr = tl.load(l_ptr + offs_r[:, None] * stride_lk + cols[None, :] * stride_ln, mask=mask_r[:, None] & mask_n[None, :], other=0.0)
        if UPCAST:
            z = z.to(tl.float32)
            lr = lr.to(tl.float32)
        acc = tl.dot(z, lr, acc, input_precision=DOT_PRECISION)
        if REST_N > 0:
            cols2 = r * N_PATCH + offs_n2
            lr2 = tl.load(l_ptr + offs_r[:, None] * stride_lk + cols2[None, :] * stride_ln, mask=mask_r[:, None] & mask_n2[None, :], other=0.0)
            acc2 = tl.dot(z, lr2.to(z.dtype), acc2, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + r * N_PATCH + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if REST_N > 0:
            acc2 += tl.load(bias_ptr + r * N_PATCH + offs_n2, mask=mask_n2, other=0.0).to(tl.float32)[None, :]
    if STORE_BY_DESC:
        # bulk tensor stores in two column halves (half the staging buffer in shared memory); the descriptor clips
        # rows past M, and the tile lies inside its patch (EVEN_N)
        halves = tl.permute(tl.reshape(acc.to(out_ptr.dtype.element_ty), (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
        left, right = tl.split(halves)
        out_desc.store([pid_m * BLOCK_M, r * N_PATCH + n0], left)
        out_desc.store([pid_m * BLOCK_M, r * N_PATCH + n0 + BLOCK_N // 2], right)
    else:
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + r * N_PATCH + offs_n[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
    if REST_N > 0:
        out2_ptrs = out_ptr + offs_m[:, None] * stride_om + r * N_PATCH + offs_n2[None, :]
        tl.store(out2_ptrs, acc2.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n2[None, :])


def _pow2_divisor(n: int, cap: int = 16) -> int:
    """The largest power of 2, up to cap, that divides n."""
    return min(n & -n, cap) if n else cap


def _n_rest(n_patch: int, block_n: int) -> int:
    """Width of the second column part when one tile spans the whole patch (FULL_PATCH_N): what block_n leaves of
    the patch, if that is a power of 2 of at least 16 and narrower than block_n; else 0 (not offered)."""
    rest = n_patch - block_n
    return rest if 16 <= rest < block_n and rest & (rest - 1) == 0 else 0


def _rest_of(n_patch: int, meta) -> int:
    """REST_N of a config (its meta-parameters): the rest width where it asks for whole-patch tiles, else 0."""
    return _n_rest(n_patch, meta["BLOCK_N"]) if meta["FULL_PATCH_N"] else 0


def _k_tail(k_patch: int, block_k: int) -> int:
    """Width of each slot's last K step when block_k does not divide the patch: the rest, if it is a power of 2 of
    at least 16 (one tensor-core step); else 0, and a masked full-width step takes it."""
    rest = k_patch % block_k
    return rest if rest >= 16 and rest & (rest - 1) == 0 else 0


@triton.heuristics({"REST_N": lambda args: _rest_of(args["N_PATCH"], args),
                     "EVEN_K": lambda args: args["K_PATCH"] % args["BLOCK_K"] == 0,
                     "EVEN_N": lambda args: args["N_PATCH"] % (args["BLOCK_N"] + args["REST_N"]) == 0,
                     "K_ALIGN": lambda args: _pow2_divisor(args["K_PATCH"]),
                     "N_ALIGN": lambda args: _pow2_divisor(args["N_PATCH"]),
                     "WN_ALIGN": lambda args: _pow2_divisor(args["stride_wn"]),
                     "WK_ALIGN": lambda args: _pow2_divisor(args["stride_wk"]),
                     "TAIL_K": lambda args: _k_tail(args["K_PATCH"], args["BLOCK_K"]),
                     "K_CHUNK": lambda args: _pow2_divisor(args["K_PATCH"], 64)})
@triton.jit
def _butterfly_mm_kernel(
    a_ptr, w_ptr, bias_ptr, z_ptr, l_ptr, out_ptr,
    M, N_PATCH, K_PATCH, RANK, B, NUM_PROGRAMS,
    stride_am, stride_om,
    stride_wr, stride_wj, stride_wn, stride_wk,
    stride_zm, stride_lk, stride_ln,
    F: tl.constexpr, PARTNER_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, RANK_BLOCK: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr,
    TMA_ALIGNED: tl.constexpr,  # not read here: it keys the autotuner, whose pruning drops TMA configs without it
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_TMA: tl.constexpr,
    PERSISTENT: tl.constexpr, TMA_STORE: tl.constexpr, GROUP_M: tl.constexpr, FLAT_K: tl.constexpr,
    FULL_PATCH_N: tl.constexpr,  # read through REST_N (heuristic): one tile spans the patch's columns
    K_ALIGN: tl.constexpr, N_ALIGN: tl.constexpr, WN_ALIGN: tl.constexpr, WK_ALIGN: tl.constexpr, TAIL_K: tl.constexpr,
    K_CHUNK: tl.constexpr, REST_N: tl.constexpr,
):
    # Triton knows an integer argument is a multiple of 16 or nothing; patches 24 or 40 wide (768- and 1280-wide
    # models at butterfly size 32) then made every load and store go element by element, with no async copies.
    # The *_ALIGN constexprs (largest power of 2 up to 16 dividing the value) say what is true; the values are unchanged.
    K_PATCH = (K_PATCH // K_ALIGN) * K_ALIGN
    N_PATCH = (N_PATCH // N_ALIGN) * N_ALIGN
    stride_wn = (stride_wn // WN_ALIGN) * WN_ALIGN
    stride_wk = (stride_wk // WK_ALIGN) * WK_ALIGN
    if USE_TMA:
        # bulk tensor copies (Hopper TMA). Needs K tiles that never cross a patch edge (EVEN_K, or TAIL_K: the
        # rest goes by pointer loads) and a contiguous weight; rows past a slot's end in the forward only feed
        # output columns that the store masks off.
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, B * K_PATCH], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K])
        if PARTNER_WEIGHT:  # weight rows are K (q), columns N (p)
            w_desc = tl.make_tensor_descriptor(w_ptr, shape=[B * F * K_PATCH, N_PATCH], strides=[N_PATCH, 1], block_shape=[BLOCK_K, BLOCK_N])
        else:  # weight rows are N (q), columns K (p)
            w_desc = tl.make_tensor_descriptor(w_ptr, shape=[B * F * N_PATCH, K_PATCH], strides=[K_PATCH, 1], block_shape=[BLOCK_N, BLOCK_K])
    else:
        a_desc, w_desc = a_ptr, w_ptr  # unused
    # TMA_STORE: the epilogue stores through a descriptor (asynchronous: in a persistent program the next tile's
    # loads overlap it) wherever a column tile stays inside its patch
    STORE_BY_DESC: tl.constexpr = TMA_STORE and EVEN_N
    if STORE_BY_DESC:
        out_desc = tl.make_tensor_descriptor(out_ptr, shape=[M, B * N_PATCH], strides=[stride_om, 1],
                                             block_shape=[BLOCK_M, BLOCK_N // 2])
    else:
        out_desc = out_ptr  # unused
    if PERSISTENT:
        # one program per SM walks the tiles (rows fastest, as the 2-D grid orders them); flattening the tile and
        # K loops lets the pipeline fetch the next tile's operands while this tile's epilogue runs
        tiles_m = tl.cdiv(M, BLOCK_M)
        tiles_n = B * tl.cdiv(N_PATCH, BLOCK_N + REST_N)
        for tile in tl.range(tl.program_id(0), tiles_m * tiles_n, NUM_PROGRAMS, flatten=True):
            if GROUP_M > 0:
                # GROUP_M row blocks at a time, every column tile of every patch for them: the programs running
                # together share those rows of A (each input patch feeds F output patches) through L2
                group_tiles = GROUP_M * tiles_n
                first_m = (tile // group_tiles) * GROUP_M
                rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
                pid_m = first_m + (tile % group_tiles) % rows_in_group
                pid_n = (tile % group_tiles) // rows_in_group
            else:
                pid_m = tile % tiles_m
                pid_n = tile // tiles_m
            _mm_tile(pid_m, pid_n, a_desc, w_desc, a_ptr, w_ptr, bias_ptr, z_ptr, l_ptr, out_ptr,
                     M, N_PATCH, K_PATCH, RANK, stride_am, stride_om, stride_wr, stride_wj, stride_wn, stride_wk,
                     stride_zm, stride_lk, stride_ln, F, PARTNER_WEIGHT, HAS_BIAS, RANK_BLOCK, UPCAST, DOT_PRECISION,
                     EVEN_K, TAIL_K, FLAT_K, K_CHUNK, BLOCK_M, BLOCK_N, BLOCK_K, USE_TMA, REST_N, out_desc, STORE_BY_DESC)
    else:
        _mm_tile(tl.program_id(0), tl.program_id(1), a_desc, w_desc, a_ptr, w_ptr, bias_ptr, z_ptr, l_ptr, out_ptr,
                 M, N_PATCH, K_PATCH, RANK, stride_am, stride_om, stride_wr, stride_wj, stride_wn, stride_wk,
                 stride_zm, stride_lk, stride_ln, F, PARTNER_WEIGHT, HAS_BIAS, RANK_BLOCK, UPCAST, DOT_PRECISION,
                 EVEN_K, TAIL_K, FLAT_K, K_CHUNK, BLOCK_M, BLOCK_N, BLOCK_K, USE_TMA, REST_N, out_desc, STORE_BY_DESC)


@triton.heuristics({"Q_ALIGN": lambda args: _pow2_divisor(args["Q"]), "P_ALIGN": lambda args: _pow2_divisor(args["P"]),
                     "SLOTS": lambda args: triton.next_power_of_2(args["F"]),
                     "REST_N": lambda args: _rest_of(args["P"], args)})
@triton.jit
def _butterfly_dw_kernel(
    g_ptr, x_ptr, dw_ptr,
    M, Q, P, B,
    stride_gm, stride_xm,
    F: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    TMA_ALIGNED: tl.constexpr,  # autotuner key (see the forward kernel)
    ATOMIC: tl.constexpr,  # dw_ptr is a zeroed fp32 buffer the programs add their tiles into
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_TMA: tl.constexpr,
    ALL_SLOTS: tl.constexpr, SPLIT_K: tl.constexpr,
    FULL_PATCH_N: tl.constexpr,  # read through REST_N (heuristic), as in the forward kernel
    Q_ALIGN: tl.constexpr, P_ALIGN: tl.constexpr, SLOTS: tl.constexpr, REST_N: tl.constexpr,
):
    Q = (Q // Q_ALIGN) * Q_ALIGN  # the patch widths' divisibility, as in the forward kernel
    P = (P // P_ALIGN) * P_ALIGN
    # the dW tile is BLOCK_M rows of q by BLOCK_N columns of p (per slot); k runs over this program's tokens.
    # REST_N > 0 (one slot per program): the tile spans the patch's p columns, the last REST_N in a second accumulator
    # fed by the same dY tile (160 = 128 + 32)
    tiles_p = tl.cdiv(P, BLOCK_N + REST_N)
    q0 = (tl.program_id(1) // tiles_p) * BLOCK_M
    p0 = (tl.program_id(1) % tiles_p) * (BLOCK_N + REST_N)
    offs_q = q0 + tl.arange(0, BLOCK_M)
    mask_q = offs_q < Q
    if ALL_SLOTS:
        # one program per output patch r computes all F slots: the X tile is the F partner patches' column blocks
        # side by side (F padded to SLOTS, a power of 2, and masked), so each dY tile is read once for all of them
        r = tl.program_id(0)
        offs_c = tl.arange(0, SLOTS * BLOCK_N)
        slot = offs_c // BLOCK_N
        offs_p = p0 + offs_c % BLOCK_N
        partner = r ^ ((1 << slot) >> 1)
        mask_p = (slot < F) & (offs_p < P)
        stored = (r * F + slot)[None, :]  # stored tile of each column
    else:
        r = tl.program_id(0) // F
        j = tl.program_id(0) % F
        partner = r ^ ((1 << j) >> 1)
        offs_p = p0 + tl.arange(0, BLOCK_N)
        mask_p = offs_p < P
        stored = tl.program_id(0)
    # SPLIT_K > 1: this program's share of the tokens, whole BLOCK_K steps (ATOMIC adds the shares up)
    k_share = tl.cdiv(tl.cdiv(M, SPLIT_K), BLOCK_K) * BLOCK_K
    k_begin = tl.program_id(2) * k_share
    k_end = tl.minimum(M, k_begin + k_share)
    offs_k = k_begin + tl.arange(0, BLOCK_K)
    g_ptrs = g_ptr + offs_k[None, :] * stride_gm + r * Q + offs_q[:, None]  # dY[:, r]^T tile (BLOCK_M, BLOCK_K)
    x_ptrs = x_ptr + offs_k[:, None] * stride_xm + (partner * P + offs_p)[None, :]
    if USE_TMA:  # one slot per program (the pruning keeps TMA away from ALL_SLOTS' gathered tile)
        # tiles that run past a patch edge read the neighbour patch; those rows/columns are masked at the store
        g_desc = tl.make_tensor_descriptor(g_ptr, shape=[M, B * Q], strides=[stride_gm, 1], block_shape=[BLOCK_K, BLOCK_M])
        x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, B * P], strides=[stride_xm, 1], block_shape=[BLOCK_K, BLOCK_N])
    acc = tl.zeros((BLOCK_M, SLOTS * BLOCK_N if ALL_SLOTS else BLOCK_N), dtype=tl.float32)
    if REST_N > 0:
        offs_p2 = p0 + BLOCK_N + tl.arange(0, REST_N)
        mask_p2 = offs_p2 < P
        x2_ptrs = x_ptr + offs_k[:, None] * stride_xm + (partner * P + offs_p2)[None, :]
        acc2 = tl.zeros((BLOCK_M, REST_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        mask_k = offs_k + (k0 - k_begin) < k_end
        if USE_TMA:
            g = g_desc.load([k0, r * Q + q0]).T
            x = x_desc.load([k0, partner * P + p0])
        else:
            g = tl.load(g_ptrs, mask=mask_q[:, None] & mask_k[None, :], other=0.0)
            x = tl.load(x_ptrs, mask=mask_k[:, None] & mask_p[None, :], other=0.0)
        if UPCAST:
            g = g.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(g, x, acc, input_precision=DOT_PRECISION)
        if REST_N > 0:  # the rest's X columns by pointer loads, in TMA configs too (a narrow tile)
            x2 = tl.load(x2_ptrs, mask=mask_k[:, None] & mask_p2[None, :], other=0.0)
            acc2 = tl.dot(g, x2.to(g.dtype), acc2, input_precision=DOT_PRECISION)
            x2_ptrs += BLOCK_K * stride_xm
        g_ptrs += BLOCK_K * stride_gm
        x_ptrs += BLOCK_K * stride_xm
    dw_ptrs = dw_ptr + (stored * Q + offs_q[:, None]) * P + offs_p[None, :]
    if ATOMIC:
        tl.atomic_add(dw_ptrs, acc, mask=mask_q[:, None] & mask_p[None, :], sem="relaxed")
    else:
        tl.store(dw_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=mask_q[:, None] & mask_p[None, :])
    if REST_N > 0:
        dw2_ptrs = dw_ptr + (stored * Q + offs_q[:, None]) * P + offs_p2[None, :]
        if ATOMIC:
            tl.atomic_add(dw2_ptrs, acc2, mask=mask_q[:, None] & mask_p2[None, :], sem="relaxed")
        else:
            tl.store(dw2_ptrs, acc2.to(dw_ptr.dtype.element_ty), mask=mask_q[:, None] & mask_p2[None, :])


def _tile(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


def _config(block_m, block_n, block_k, warps, stages, tma=False, persistent=False, tma_store=False, group_m=0, flat_k=False,
            full_n=False):
    """A forward/dX kernel config: schedule (persistent), store (tma_store), tile order (group_m), K walk (flat_k),
    columns (full_n: one tile spans the patch as block_n plus a narrower rest)."""
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "USE_TMA": tma,
                          "PERSISTENT": persistent, "TMA_STORE": tma_store, "GROUP_M": group_m, "FLAT_K": flat_k,
                          "FULL_PATCH_N": full_n}, num_warps=warps, num_stages=stages)


def _dw_config(block_m, block_n, block_k, warps, stages, tma=False, all_slots=False, split_k=1, full_n=False):
    """A dW kernel config: all_slots = one program per patch computes every slot; split_k = token splits; full_n =
    one tile spans the patch's p columns as block_n plus a narrower rest."""
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "USE_TMA": tma,
                          "ALL_SLOTS": all_slots, "SPLIT_K": split_k, "FULL_PATCH_N": full_n},
                         num_warps=warps, num_stages=stages)


# (rows, cols, k) tiles tried on the GPU; pruned to what the patch sizes can fill. For the dW kernel the
# rows/cols are the tile's (q, p) and k runs over tokens. The large tiles also come as TMA variants, and for the
# forward/dX kernel the largest TMA tiles also as persistent variants: the autotuner decides per shape what pays.
_TILES = [
    (128, 128, 64, 8, 3), (128, 128, 64, 4, 4), (128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (256, 128, 64, 8, 4),
    (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (64, 32, 32, 4, 4),
    (256, 64, 64, 8, 3),  # narrow patches (q = 64): more rows per program reuse each weight tile more
]
_DW_SMALL_TILES = [(32, 64, 64, 4, 4), (32, 128, 64, 4, 4)]  # patches of <= 32 rows (q = 24); too short for wgmma
# 32-wide N or K for patches that narrow (1024 -> 4096 at butterfly size 32: 32-wide input patches) or that 32 tiles
# exactly and 64 does not (96, 160); the pruning offers them only there, so other patches keep their tuning time
_NARROW_TILES = [(128, 32, 64, 4, 4), (256, 32, 64, 8, 4), (128, 128, 32, 8, 4), (128, 256, 32, 8, 4), (256, 128, 32, 8, 4)]
_TMA_TILES = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (256, 128, 64, 8, 4), (128, 64, 64, 4, 4),
              (256, 64, 64, 8, 3)]
_PERSISTENT_TILES = [(128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (256, 128, 64, 8, 3),
                     (128, 128, 32, 8, 4), (256, 32, 64, 8, 4)]
# K steps across the slots (FLAT_K; pointer loads): for K patches no power-of-2 step divides
_FLAT_K_TILES = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
                 (128, 128, 32, 8, 4)]
# one tile per patch, block_n columns plus a narrower power-of-2 rest (FULL_PATCH_N), for patch widths that are not a
# power of 2: 48 = 32 + 16, 80 = 64 + 16, 96 = 64 + 32, 160 = 128 + 32, 192 = 128 + 64, 320 = 256 + 64
_FULL_N_TILES = [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 4, 4), (128, 32, 64, 4, 4), (256, 32, 64, 8, 3),
                 (64, 256, 64, 8, 3)]
# persistent with descriptor stores: the staging buffer costs shared memory, so one stage fewer on the largest tiles
_PERSISTENT_STORE_TILES = [(128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 32, 8, 4)]
# dW tiles per slot (columns) when one program computes all F slots: the accumulator is rows x (F padded to a power of
# 2) x cols, at most 128 x 256
_ALL_SLOTS_TILES = [(64, 64, 64, 4, 4), (128, 64, 64, 8, 3), (64, 32, 64, 4, 4), (128, 32, 64, 8, 4), (64, 128, 64, 4, 3),
                    (128, 128, 64, 8, 3)]


def _dw_configs(split_k: int, all_slots_tiles):
    """The dW tiles tried per slot (pointer loads, and TMA where the tile allows), and the all-slot ones."""
    return ([_dw_config(*t, split_k=split_k) for t in _TILES + _DW_SMALL_TILES + _NARROW_TILES]
            + [_dw_config(*t, tma=True, split_k=split_k) for t in _TMA_TILES + _NARROW_TILES]
            + [_dw_config(*t, all_slots=True, split_k=split_k) for t in all_slots_tiles]
            + [_dw_config(*t, full_n=True, split_k=split_k) for t in _FULL_N_TILES[:4]]
            + [_dw_config(*t, tma=True, full_n=True, split_k=split_k) for t in _FULL_N_TILES[:3]])


DW_CONFIGS = _dw_configs(1, _ALL_SLOTS_TILES[:2])
# the token-split kernel (shapes with less than a wave of tiles), its partial tiles added atomically into fp32: every
# config of the direct kernel as one share (session 7: without them three shapes lost their direct winner and got
# slower), all-slot tiles, and the per-slot tiles these shapes pick, in 2 or 4 shares
DW_SPLIT_CONFIGS = (_dw_configs(1, _ALL_SLOTS_TILES)
                    + [_dw_config(*t, all_slots=True, split_k=s) for t in _ALL_SLOTS_TILES for s in (2, 4)]
                    + [_dw_config(*t, split_k=s) for t in ((128, 64, 64, 4, 4), (64, 64, 64, 4, 4), (128, 128, 64, 4, 4),
                                                           (128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (128, 32, 64, 4, 4),
                                                           (32, 128, 64, 4, 4)) for s in (2, 4)]
                    + [_dw_config(128, 64, 64, 4, 4, tma=True, split_k=s) for s in (2, 4)])
MM_CONFIGS = ([_config(*t) for t in _TILES + _NARROW_TILES]
              + [_config(*t, tma=True) for t in _TMA_TILES + _NARROW_TILES]
              + [_config(*t, tma=True, persistent=True) for t in _PERSISTENT_TILES]
              + [_config(*t, tma=True, persistent=True, tma_store=True) for t in _PERSISTENT_STORE_TILES]
              # the usual persistent winners again, walking 8 row blocks across all patches at a time
              + [_config(*t, tma=True, persistent=True, tma_store=store, group_m=8)
                 for t, store in (((128, 256, 64, 8, 4), False), ((256, 128, 64, 8, 3), False), ((128, 256, 64, 8, 3), True))]
              + [_config(*t, flat_k=True) for t in _FLAT_K_TILES]
              # the same K walk in persistent programs, whose descriptor stores let the next tile's loads run
              + [_config(*t, persistent=True, tma_store=store, flat_k=True)
                 for t, store in (((128, 128, 64, 8, 3), False), ((128, 128, 64, 8, 3), True), ((128, 256, 64, 8, 3), True))]
              + [_config(*t, full_n=True) for t in _FULL_N_TILES]
              + [_config(*t, tma=True, full_n=True) for t in _FULL_N_TILES[:3]]
              + [_config(128, 128, 64, 8, 4, tma=True, persistent=True, full_n=True),
                 _config(128, 128, 64, 8, 3, tma=True, persistent=True, tma_store=True, full_n=True)]
              + [_config(*t, flat_k=True, full_n=True) for t in _FULL_N_TILES[:4]])


def _whole_k_tiles(patch_k: int, block_k: int) -> bool:
    """Every K tile of a full-width step stays inside its patch (what TMA loads need)."""
    return patch_k % block_k == 0 or _k_tail(patch_k, block_k) > 0


def _prune(configs, named_args, rows: str, cols: str, k: str, patch_k: str | None):
    """Keep configs whose tiles are no larger than the next power of 2 of what they cover, and 32 wide only where
    the patch is that narrow, or where 32 divides it and 64 does not (96- and 160-wide patches: no masked waste,
    and TMA becomes possible), or (K of the forward/dX) where 32 leaves a tail step and 64 does not (48 = 32 + 16);
    K steps across slots (FLAT_K) only where the step does not divide the K patch;
    whole-patch column tiles (FULL_PATCH_N) only where the patch is BLOCK_N plus a narrower power of 2 and the two
    accumulators stay within 128 x 256;
    TMA configs only where the operands are 16-byte aligned and (forward/dX) K tiles stay inside a patch;
    descriptor stores only where the operands are aligned and column tiles stay inside a patch."""
    sizes = {"BLOCK_M": named_args[rows], "BLOCK_N": named_args[cols], "BLOCK_K": named_args[k]}

    def fits(c):
        def ok(key, tile, size):
            tail_pays = key == "BLOCK_K" and patch_k is not None and _k_tail(size, 32) > 0 and _k_tail(size, 64) == 0
            narrow_pays = size <= 32 or (size % 64 != 0 and (size % 32 == 0 or tail_pays))
            return tile <= max(16, triton.next_power_of_2(size)) and (tile >= 64 or narrow_pays)
        checked = ["BLOCK_M"]
        if c.kwargs.get("FULL_PATCH_N"):  # the columns: the whole patch as BLOCK_N + rest
            width = named_args[cols]
            if not _n_rest(width, c.kwargs["BLOCK_N"]) or c.kwargs["BLOCK_M"] * width > 128 * 256:
                return False
        else:
            checked.append("BLOCK_N")
        if c.kwargs.get("FLAT_K"):  # steps over all slots' K at once: only where the step does not divide a patch
            if named_args[patch_k] % c.kwargs["BLOCK_K"] == 0:
                return False
        else:
            checked.append("BLOCK_K")
        return all(ok(key, c.kwargs[key], sizes[key]) for key in checked)

    def tma_ok(c):
        return named_args["TMA_ALIGNED"] and (patch_k is None or _whole_k_tiles(named_args[patch_k], c.kwargs["BLOCK_K"]))

    def store_ok(c):
        return not c.kwargs.get("TMA_STORE") or (named_args["TMA_ALIGNED"] and (
            c.kwargs.get("FULL_PATCH_N") or named_args[cols] % c.kwargs["BLOCK_N"] == 0))

    kept = [c for c in configs if fits(c) and (not c.kwargs["USE_TMA"] or tma_ok(c)) and store_ok(c)]
    # nothing fits (tiny patches): the smallest tile wastes the least
    return kept or [min((c for c in configs if not c.kwargs["USE_TMA"]), key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


def _time_graph_replays(kernel_call, quantiles):
    """The GPU time of one config: a CUDA graph of the call, replayed. Timing the call itself times Triton's launch
    path (tens of us of host time, more than a small product runs) whenever the host is slower than the kernel, and
    worst while other processes load the CPU: session 10's table, tuned by two processes at once, had 48 of 120 picks
    differ from session 8's, a 1024 -> 4096 forward 0.069 -> 0.098 ms."""
    kernel_call()  # compile and load first: a config over the GPU's resources fails here, and the autotuner skips it
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        kernel_call()
    return triton.testing.do_bench(graph.replay, quantiles=quantiles)


# threads that compile a cold key's configs: one per CPU this process may use
_COMPILE_THREADS = min(32, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


class _Autotuner(Autotuner):
    """Triton's autotuner (results cached on disk), timing GPU time only (_time_graph_replays), and a key it has to
    time is compiled first, every config at once in threads: compiling dominated a cold key (session 10: 85 s for one
    768 -> 3072 layout's products, ~0.5 s per config and up to ~50 configs per key), and Triton's compiler releases
    the GIL. The timing itself stays one config after another."""

    def __init__(self, kernel, configs, key, prune, reset_to_zero=None):
        super().__init__(kernel, kernel.arg_names, configs, key, reset_to_zero, None,
                         prune_configs_by={"early_config_prune": lambda configs, named_args, **kw: prune(configs, {**named_args, **kw})},
                         do_bench=_time_graph_replays, cache_results=True)
        self._call = None

    def run(self, *args, **kwargs):
        self._call = (args, kwargs)
        try:
            return super().run(*args, **kwargs)
        finally:
            self._call = None

    def check_disk_cache(self, tuning_key, configs, bench_fn):
        def compile_then_time():
            args, kwargs = self._call
            # errors (a config over the shared memory) surface again when the autotuner runs that config, which skips it
            with ThreadPoolExecutor(_COMPILE_THREADS) as pool, AsyncCompileMode(pool, ignore_errors=True):
                for config in configs:
                    self.fn.run(*args, **{**kwargs, "warmup": True}, **config.all_kwargs())
            bench_fn()

        return super().check_disk_cache(tuning_key, configs, compile_then_time)


_butterfly_mm_tuned = _Autotuner(
    _butterfly_mm_kernel, MM_CONFIGS,
    key=["M", "N_PATCH", "K_PATCH", "F", "PARTNER_WEIGHT", "RANK_BLOCK", "TMA_ALIGNED"],  # the low-rank segment changes what is fastest
    prune=lambda configs, named_args: _prune(configs, named_args, "M", "N_PATCH", "K_PATCH", "K_PATCH"),
)

def _prune_dw(configs, named_args):
    """_prune, and all-slot tiles only where there are several slots and the accumulator stays within 128 x 256;
    token splits only where each share keeps at least 1024 tokens; whole-patch tiles only on 16-byte aligned
    operands."""
    slots = triton.next_power_of_2(named_args["F"])

    def ok(c):
        kw = c.kwargs
        if kw["ALL_SLOTS"] and (slots == 1 or kw["USE_TMA"] or kw["FULL_PATCH_N"] or kw["BLOCK_M"] * slots * kw["BLOCK_N"] > 128 * 256):
            return False
        # session 9, H200, Triton 3.6: a whole-patch tile (80 = 64 + 16) on a dY/X base 2 bytes past 16-byte alignment
        # stopped with an illegal memory access; the same config on aligned operands, and the forward/dX kernels'
        # whole-patch tiles on misaligned inputs, ran right. The interpreter finds every address in bounds
        # (tests/bounds_check.py), and the sm_90 code read on CPU (2-byte loads, no pipelining; the rest's X tile
        # reuses the main one's shared buffer after a wgmma wait) shows no fault. Not root-caused: such operands get
        # the other tiles.
        if kw["FULL_PATCH_N"] and not named_args["TMA_ALIGNED"]:
            return False
        return named_args["M"] // kw["SPLIT_K"] >= 1024 or kw["SPLIT_K"] == 1

    kept = [c for c in configs if ok(c)]
    return _prune(kept or configs[:1], named_args, "Q", "P", "M", None)


_DW_KEY = ["M", "Q", "P", "F", "TMA_ALIGNED"]
_butterfly_dw_tuned = _Autotuner(_butterfly_dw_kernel, DW_CONFIGS, _DW_KEY, _prune_dw)
# the autotuner runs every config into the same buffer: zero it before each (and before the chosen one's real run)
_butterfly_dw_split_tuned = _Autotuner(_butterfly_dw_kernel, DW_SPLIT_CONFIGS, _DW_KEY, _prune_dw, reset_to_zero=["dw_ptr"])


def _tma_aligned(*tensors: torch.Tensor) -> bool:
    """TMA descriptors need 16-byte aligned base addresses and row strides. While torch.compile traces (fake
    tensors: no address yet) the storage offset decides: allocations are aligned, and Inductor copies graph
    inputs that are not."""
    def base_aligned(t):
        if type(t) in (torch.Tensor, torch.nn.Parameter):
            return t.data_ptr() % 16 == 0
        return t.storage_offset() * t.element_size() % 16 == 0

    return all(base_aligned(t) and t.stride(0) * t.element_size() % 16 == 0 for t in tensors)


def _tma_scratch(size: int, alignment: int, stream):
    # device-side descriptors live in a small global scratch buffer that Triton asks the allocator for
    return torch.empty(size, dtype=torch.int8, device="cpu" if INTERPRET else "cuda")


def _traced(*tensors: torch.Tensor) -> bool:
    """Fake or functional tensors: torch.compile is tracing a triton_op's body."""
    return any(type(t) not in (torch.Tensor, torch.nn.Parameter) for t in tensors)


def _launch(kernel, tuned, grid, args, kwargs, config, default, patch_k=None, patch_n=None):
    """Run with an explicit config, the autotuner (GPU), or a fixed default (the interpreter cannot tune; `default`
    is a function, so the GPU path does not pay for computing it).

    config: (block_m, block_n, block_k, num_warps, num_stages[, use_tma[, persistent[, tma_store[, group_m[, flat_k[,
    full_patch_n]]]]]]) for the forward/dX kernel, use_tma and tma_store only on 16-byte aligned operands, group_m only
    when persistent, flat_k only without TMA loads, full_patch_n only where the patch is block_n plus a narrower power
    of 2 of at least 16;
    (block_m, block_n, block_k, num_warps, num_stages[, use_tma[, all_slots[, split_k[, full_patch_n]]]]) for the dW
    kernel, full_patch_n there also only on 16-byte aligned operands (see _prune_dw).
    """
    # per launch, not once: the allocator is a ContextVar, and autograd runs the backward in its own thread
    triton.set_allocator(_tma_scratch)
    if config is None and not INTERPRET:
        # plain tensors: launch directly; fake/functional tensors mean torch.compile is tracing the triton_op,
        # which needs the traceable wrapper (in eager the wrapper would route every call through a HOP)
        if _traced(*(a for a in args if isinstance(a, torch.Tensor))):
            wrap_triton(tuned)[grid](*args, **kwargs)
        else:
            launch_tuned(tuned, grid, args, kwargs)
        return
    block_m, block_n, block_k, warps, stages, *flags = config or default()
    use_tma = len(flags) > 0 and bool(flags[0])
    if use_tma and not (kwargs["TMA_ALIGNED"] and (patch_k is None or _whole_k_tiles(patch_k, block_k))):
        raise ValueError(f"config {config} asks for TMA, but the operands are not 16-byte aligned or block_k={block_k} "
                         f"leaves a rest of the patch width {patch_k} that is not a power of 2 >= 16; use a config "
                         "without TMA")
    meta = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "USE_TMA": use_tma}
    if "SPLIT_K" in kernel.arg_names:
        meta["ALL_SLOTS"] = len(flags) > 1 and bool(flags[1])
        meta["SPLIT_K"] = int(flags[2]) if len(flags) > 2 else 1
        meta["FULL_PATCH_N"] = len(flags) > 3 and bool(flags[3])
        if meta["ALL_SLOTS"] and (use_tma or meta["FULL_PATCH_N"]):
            raise ValueError(f"config {config} asks for all slots per program with TMA or a tile across the patch; the "
                             "gathered X tile needs pointer loads and one column width: set use_tma=False, full_patch_n=False")
        if meta["FULL_PATCH_N"] and not kwargs["TMA_ALIGNED"]:
            raise ValueError(f"config {config} asks for a dW tile across the patch, but dY or X is not 16-byte aligned "
                             "(an illegal memory access on the H200, see _prune_dw): set full_patch_n=False")
    if "NUM_PROGRAMS" in kernel.arg_names:
        meta["PERSISTENT"] = len(flags) > 1 and bool(flags[1])
        meta["TMA_STORE"] = len(flags) > 2 and bool(flags[2])
        meta["GROUP_M"] = int(flags[3]) if len(flags) > 3 else 0
        meta["FLAT_K"] = len(flags) > 4 and bool(flags[4])
        meta["FULL_PATCH_N"] = len(flags) > 5 and bool(flags[5])
        if meta["TMA_STORE"] and not kwargs["TMA_ALIGNED"]:
            raise ValueError(f"config {config} asks for descriptor stores, but the operands are not 16-byte aligned; "
                             "set tma_store=False")
        if meta["FLAT_K"] and use_tma:
            raise ValueError(f"config {config} asks for TMA and K steps across slots; those gather their K by "
                             "pointer loads: set use_tma=False")
    if meta["FULL_PATCH_N"] and not _n_rest(patch_n, block_n):
        raise ValueError(f"config {config} asks for one tile across the patch, but the patch is {patch_n} wide: that "
                         "needs block_n plus a narrower power of 2 of at least 16; set full_patch_n=False")
    kernel[grid(meta)](*args, **kwargs, **meta, num_warps=warps, num_stages=stages)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    # persistent programs: one per SM; the interpreter gets a few, so tests walk several tiles per program
    return 3 if INTERPRET else torch.cuda.get_device_properties(device).multi_processor_count


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs follow torch's matmul setting, so the kernel matches F.linear's precision; half inputs
    # ignore the flag ("tf32" is tl.dot's default)
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def _check(name: str, t: torch.Tensor, dim: int):
    if t.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{name} has dtype {t.dtype}; the Triton kernels take float16, bfloat16 or float32")
    if t.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            f"{name} is on {t.device}; the Triton kernels need a CUDA tensor, or TRITON_INTERPRET=1 set before "
            "pixelfly_kernels is imported (CPU interpreter, slow), or backend='reference'."
        )


def _output(out, shape, like: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, device=like.device, dtype=like.dtype)
    if tuple(out.shape) != tuple(shape) or out.dtype != like.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {like.dtype} tensor of shape {tuple(shape)}, got {tuple(out.shape)}")
    return out


def _launch_mm(a, weight, bias, z, lowrank, partner_weight: bool, out, config) -> torch.Tensor:
    _check("input", a, 2)
    _check("weight", weight, 4)
    B, F, q, p = weight.shape
    n_patch, k_patch = (p, q) if partner_weight else (q, p)
    if a.shape[1] != B * k_patch:
        raise ValueError(f"input has {a.shape[1]} features, the weight expects {B * k_patch}")
    a = a if a.stride(1) == 1 else a.contiguous()
    weight = weight.contiguous()
    M = a.shape[0]
    out = _output(out, (M, B * n_patch), a)
    sr, sj, sq, sp = weight.stride()
    stride_wn, stride_wk = (sp, sq) if partner_weight else (sq, sp)
    rank = 0 if z is None else z.shape[1]
    if rank:
        z = z if z.stride(1) == 1 else z.contiguous()
        # the segment reads a (rank x columns) factor: V (rank x in) as stored for dX; U (out x rank) for the
        # forward, transposed into a contiguous copy (tiny) so the loads along the output columns coalesce
        lowrank = lowrank if partner_weight else lowrank.t().contiguous()
        stride_lk, stride_ln = lowrank.stride(0), lowrank.stride(1)
    else:
        stride_lk = stride_ln = 0

    num_sms = _num_sms(a.device)

    def grid(meta):
        tiles = (triton.cdiv(M, meta["BLOCK_M"]), B * triton.cdiv(n_patch, meta["BLOCK_N"] + _rest_of(n_patch, meta)))
        return (min(num_sms, tiles[0] * tiles[1]), 1) if meta["PERSISTENT"] else tiles

    args = (a, weight, bias if bias is not None else a, z if rank else a, lowrank if rank else a, out,
            M, n_patch, k_patch, rank, B, num_sms, a.stride(0), out.stride(0), sr, sj, stride_wn, stride_wk,
            z.stride(0) if rank else 0, stride_lk, stride_ln)
    kwargs = dict(F=F, PARTNER_WEIGHT=partner_weight, HAS_BIAS=bias is not None,
                  RANK_BLOCK=max(16, triton.next_power_of_2(rank)) if rank else 0,
                  UPCAST=INTERPRET, DOT_PRECISION=_dot_precision(a.dtype), TMA_ALIGNED=_tma_aligned(a, weight.view(-1, p), out))
    def default():
        return _tile(M, 16, 128), _tile(n_patch, 16, 128), _tile(k_patch, 16, 64), 4, 3

    _launch(_butterfly_mm_kernel, _butterfly_mm_tuned, grid, args, kwargs, config, default, patch_k=k_patch, patch_n=n_patch)
    return out


def butterfly_matmul(x, weight, bias=None, z=None, lowrank_u=None, out=None, config=None) -> torch.Tensor:
    """Y = X @ S^T (+ Z @ U^T) (+ bias): x (T, in), weight (B, F, q, p), z = X @ V^T (T, rank), U (out, rank).

    config: (block_m, block_n, block_k, num_warps, num_stages) to bypass the autotuner (benchmarks).
    """
    return _launch_mm(x, weight, bias, z, lowrank_u, partner_weight=False, out=out, config=config)


def butterfly_matmul_t(grad, weight, dz=None, lowrank_v=None, out=None, config=None) -> torch.Tensor:
    """dX = dY @ S (+ dZ @ V): grad (T, out), weight (B, F, q, p), dz = dY @ U (T, rank), V (rank, in)."""
    return _launch_mm(grad, weight, None, dz, lowrank_v, partner_weight=True, out=out, config=config)


def _dw_token_split(tiles: int, num_sms: int, traced: bool) -> bool:
    """Less than one wave of 128 x 128 dW tiles: the split kernel can spread the tokens over the idle SMs. Its
    atomic adds sum in no fixed order, so not under torch.use_deterministic_algorithms; and not in torch.compile's
    graphs, where its dW came out hundreds of times too large on the GPU (benchmarks/NOTES.md, session 8: the
    partial sums of repeated runs pile up in the zeroed buffer) and the direct kernel is exact."""
    return tiles < num_sms and not traced and not torch.are_deterministic_algorithms_enabled()


def butterfly_matmul_dw(grad: torch.Tensor, x: torch.Tensor, n_slots: int, butterfly_size: int, out=None, config=None) -> torch.Tensor:
    """dW[r, j] = dY[:, r]^T @ X[:, r ^ o_j]: grad (T, out), x (T, in) -> (B, F, q, p) in x's dtype.

    config: (block_m, block_n, block_k, num_warps, num_stages[, use_tma[, all_slots[, split_k[, full_patch_n]]]]) to
    bypass the autotuner; split_k > 1 sums the token splits atomically in fp32.
    """
    _check("grad", grad, 2)
    _check("input", x, 2)
    if grad.shape[0] != x.shape[0]:
        raise ValueError(f"grad has {grad.shape[0]} rows and input {x.shape[0]}; they must match")
    B, F = butterfly_size, n_slots
    q, p = grad.shape[1] // B, x.shape[1] // B
    grad = grad if grad.stride(1) == 1 else grad.contiguous()
    x = x if x.stride(1) == 1 else x.contiguous()
    M = x.shape[0]
    dw = _output(out, (B, F, q, p), x)
    if config is None:
        atomic = not INTERPRET and _dw_token_split(B * F * triton.cdiv(q, 128) * triton.cdiv(p, 128), _num_sms(x.device),
                                                   _traced(grad, x))
    else:
        atomic = len(config) > 7 and config[7] > 1
    # the atomic kernel adds into zeroed fp32 (dW itself when it is fp32)
    target = (dw.zero_() if dw.dtype == torch.float32 else torch.zeros(dw.shape, dtype=torch.float32, device=dw.device)) if atomic else dw

    def grid(meta):
        tiles_p = triton.cdiv(p, meta["BLOCK_N"] + _rest_of(p, meta))
        return B * (1 if meta["ALL_SLOTS"] else F), triton.cdiv(q, meta["BLOCK_M"]) * tiles_p, meta["SPLIT_K"]

    args = (grad, x, target, M, q, p, B, grad.stride(0), x.stride(0))
    kwargs = dict(F=F, UPCAST=INTERPRET, DOT_PRECISION=_dot_precision(x.dtype), TMA_ALIGNED=_tma_aligned(grad, x), ATOMIC=atomic)

    def default():
        return _tile(q, 16, 128), _tile(p, 16, 128), _tile(M, 16, 64), 4, 3

    tuned = _butterfly_dw_split_tuned if atomic else _butterfly_dw_tuned
    _launch(_butterfly_dw_kernel, tuned, grid, args, kwargs, config, default, patch_n=p)
    if target is not dw:
        dw.copy_(target)
    return dw
