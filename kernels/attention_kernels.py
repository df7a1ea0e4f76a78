"""Triton kernels for Pixelfly attention's static pattern: one softmax over the allowed keys, forward and backward.

The pattern (``butterfly_attention.pattern_allows``) is fixed per sequence length, so each query block's key blocks
(and each key block's query blocks, for dK/dV) come from small int32 tables (attention_launch.block_tables), and only
the causal diagonal tile carries an element mask. Forward as FlashAttention-2 saving the log-sum-exp; backward as one
kernel for dQ per query tile, which also stores rowsum(O * dO), then one for dK/dV per key tile over the transposed
table, both recomputing P.

Work per program is uneven: the global key block is seen by every query block (31 blocks at S = 4096 against about
4 for the others), and bidirectionally the global query block sees every key block. Launched in block order, one
late heavy program leaves the GPU idle behind it, so the programs of such heavy blocks go first ("order" tables) and
the rest follow head by head, which keeps a head's blocks together in L2 (on an H200 at S = 4096: 10-14% less
forward+backward time than head by head alone, docs/dev/optimisation-notes.md "A2").
"""
import triton
import triton.language as tl


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
def attention_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr, bias_ptr, rows_ptr, n_rows_ptr, order_ptr, n_heavy, qk_scale,
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
    Adding dQ here atomically instead of in a kernel of its own measured no faster (docs/dev/optimisation-notes.md)."""
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
def attention_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, bias_ptr, dk_ptr, dv_ptr, cols_ptr, n_cols_ptr,
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
def attention_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, bias_ptr, dq_ptr, rows_ptr, n_rows_ptr, order_ptr,
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
