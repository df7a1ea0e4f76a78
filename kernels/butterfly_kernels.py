"""The Triton kernels of the flat block butterfly product and its two gradients, and the tile arithmetic their
heuristics share with the configs and launchers.

Weight layout (shared with reference.py): weight[r, j] is the (q x p) tile of W at tile row r and tile
column r ^ offset_j, offset_j = (1 << j) >> 1. The XOR is computed in the kernel: no look-up tables, no
densified weight.

  forward  Y[:, r]   = sum_j X[:, r ^ o_j]  @ weight[r, j]^T          (K = p per slot)
  dX       dX[:, c]  = sum_j dY[:, c ^ o_j] @ weight[c ^ o_j, j]      (same kernel, K = q; symmetric pattern)
  dW       dW[r, j]  = dY[:, r]^T @ X[:, r ^ o_j]                      (K = tokens)

Every output tile stays inside one output patch, so its K loop walks F contiguous slabs of the input.
Accumulation is fp32; inputs are fp32, fp16 or bf16. A config (butterfly_configs.py) chooses between pointer loads
and TMA descriptor loads (Hopper's bulk tensor copies; only where the operands are 16-byte aligned), and for the
forward/dX kernel between one tile per program and a persistent program per SM; where a patch width is no power of
2 (160 = 128 + 32), also tiles that span the patch in two power-of-2 column parts.
"""
import triton
import triton.language as tl


def pow2_divisor(n: int, cap: int = 16) -> int:
    """The largest power of 2, up to cap, that divides n."""
    return min(n & -n, cap) if n else cap


def rest_width(n_patch: int, block_n: int) -> int:
    """Width of the second column part when one tile spans the whole patch (FULL_PATCH_N): what block_n leaves of
    the patch, if that is a power of 2 of at least 16 and narrower than block_n; else 0 (not offered)."""
    rest = n_patch - block_n
    return rest if 16 <= rest < block_n and rest & (rest - 1) == 0 else 0


def config_rest(n_patch: int, meta) -> int:
    """REST_N of a config (its meta-parameters): the rest width where it asks for whole-patch tiles, else 0."""
    return rest_width(n_patch, meta["BLOCK_N"]) if meta["FULL_PATCH_N"] else 0


def k_tail(k_patch: int, block_k: int) -> int:
    """Width of each slot's last K step when block_k does not divide the patch: the rest, if it is a power of 2 of
    at least 16 (one tensor-core step); else 0, and a masked full-width step takes it."""
    rest = k_patch % block_k
    return rest if rest >= 16 and rest & (rest - 1) == 0 else 0


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



@triton.heuristics({"REST_N": lambda args: config_rest(args["N_PATCH"], args),
                     "EVEN_K": lambda args: args["K_PATCH"] % args["BLOCK_K"] == 0,
                     "EVEN_N": lambda args: args["N_PATCH"] % (args["BLOCK_N"] + args["REST_N"]) == 0,
                     "K_ALIGN": lambda args: pow2_divisor(args["K_PATCH"]),
                     "N_ALIGN": lambda args: pow2_divisor(args["N_PATCH"]),
                     "WN_ALIGN": lambda args: pow2_divisor(args["stride_wn"]),
                     "WK_ALIGN": lambda args: pow2_divisor(args["stride_wk"]),
                     "TAIL_K": lambda args: k_tail(args["K_PATCH"], args["BLOCK_K"]),
                     "K_CHUNK": lambda args: pow2_divisor(args["K_PATCH"], 64)})
@triton.jit
def butterfly_mm_kernel(
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


@triton.heuristics({"Q_ALIGN": lambda args: pow2_divisor(args["Q"]), "P_ALIGN": lambda args: pow2_divisor(args["P"]),
                     "SLOTS": lambda args: triton.next_power_of_2(args["F"]),
                     "REST_N": lambda args: config_rest(args["P"], args)})
@triton.jit
def butterfly_dw_kernel(
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
