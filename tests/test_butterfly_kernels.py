"""The three butterfly products, Triton (CPU interpreter here, CUDA in research/check_gpu.py) and reference,
against a float64 dense masked matmul on fresh random inputs."""
import threading
import time
import zlib

import pytest
import torch
import triton
import triton.language as tl
from backends import BACKENDS

from pixelfly_hf.patterns import FlatButterflyLayout
from pixelfly_kernels import butterfly_launch as triton_impl
from pixelfly_kernels import reference
from pixelfly_kernels.butterfly_configs import (DW_CONFIGS, DW_SPLIT_CONFIGS, MM_CONFIGS, DwConfig, MatmulConfig, prune_dw,
                                                prune_matmul)
from pixelfly_kernels.butterfly_kernels import butterfly_mm_kernel, k_tail

# (tokens, in, out, butterfly_size, n_factors): in != out, out < in, non-square and non-power-of-2 tiles,
# tile edge == block_size (16), odd token counts
SHAPES = [
    (37, 64, 128, 4, 2),
    (50, 128, 64, 4, 1),
    (19, 96, 48, 2, 1),
    (64, 48, 96, 2, 0),
    (33, 256, 128, 8, 3),
    (70, 192, 384, 8, 2),
    (23, 160, 80, 4, 2),  # 40- and 20-wide patches: the kernels' alignment hints are 8 and 4 elements here
]
TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def dense_mask(layout: FlatButterflyLayout) -> torch.Tensor:
    return layout.element_mask().to(torch.float64)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    assert torch.isfinite(got).all(), "output has NaN/inf: an element was not written"
    return ((got.double() - want).norm() / want.norm()).item()


def make_case(tokens, in_f, out_f, bs, k, dtype):
    layout = FlatButterflyLayout(out_f, in_f, bs, k, block_size=16)
    q, p = layout.tile_shape
    weight = torch.randn(bs, k + 1, q, p).to(dtype)
    # the dense matrix from the definition: tile (r, c) is stored iff r ^ c is 0 or 2^i, i < k, in slot j
    # where (1 << j) >> 1 == r ^ c
    slot_of_offset = {(1 << j) >> 1: j for j in range(k + 1)}
    dense = torch.zeros(out_f, in_f, dtype=torch.float64)
    for r in range(bs):
        for c in range(bs):
            if (r ^ c) in slot_of_offset:
                dense[r * q:(r + 1) * q, c * p:(c + 1) * p] = weight[r, slot_of_offset[r ^ c]].double()
    assert torch.equal(dense != 0, layout.element_mask())
    x = torch.randn(tokens, in_f).to(dtype)
    grad = torch.randn(tokens, out_f).to(dtype)
    return layout, weight, dense, x, grad


IMPLS = {"triton": triton_impl, "reference": reference}


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_products_match_dense_masked_float64(impl, dtype, shape):
    torch.manual_seed(zlib.crc32(repr((impl, dtype, shape)).encode()))
    layout, weight, dense, x, grad = make_case(*shape, dtype)
    bias = torch.randn(layout.out_features).to(dtype)
    x64, g64 = x.double(), grad.double()
    tol = TOLERANCE[dtype]
    mod = IMPLS[impl]
    if impl == "triton":  # poison the outputs: every element must be written
        y = mod.butterfly_matmul(x, weight, bias, out=torch.full((x.shape[0], layout.out_features), float("nan"), dtype=dtype))
        dx = mod.butterfly_matmul_t(grad, weight, out=torch.full_like(x, float("nan")))
        dw = mod.butterfly_matmul_dw(grad, x, layout.n_slots, layout.butterfly_size, out=torch.full_like(weight, float("nan")))
    else:
        y = mod.butterfly_matmul(x, weight, bias)
        dx = mod.butterfly_matmul_t(grad, weight)
        dw = mod.butterfly_matmul_dw(grad, x, layout.n_slots, layout.butterfly_size)
    assert y.dtype == dx.dtype == dw.dtype == dtype
    assert rel_err(y, x64 @ dense.T + bias.double()) < tol
    assert rel_err(dx, g64 @ dense) < tol
    dw_dense = (g64.T @ x64) * dense_mask(layout)
    assert rel_err(reference.butterfly_to_dense(dw.double()), dw_dense) < tol


def test_dense_round_trip_and_layout_agree():
    layout = FlatButterflyLayout(96, 192, 4, 2, block_size=16)
    w = torch.randn(4, 3, 24, 48)
    dense = reference.butterfly_to_dense(w)
    assert torch.equal(dense != 0, layout.element_mask())
    assert torch.equal(reference.dense_to_butterfly(dense, 4, 3), w)


def test_triton_launcher_rejects_bad_inputs():
    w = torch.randn(4, 2, 16, 16)
    with pytest.raises(ValueError, match="input has 48 features, the weight expects 64"):
        triton_impl.butterfly_matmul(torch.randn(8, 48), w)
    with pytest.raises(TypeError, match="torch.int32"):
        triton_impl.butterfly_matmul(torch.ones(8, 64, dtype=torch.int32), w)
    with pytest.raises(ValueError, match="out must be a contiguous"):
        triton_impl.butterfly_matmul(torch.randn(8, 64), w, out=torch.empty(8, 32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(70, 192, 384, 4, 1), (33, 256, 128, 8, 3), (45, 384, 192, 4, 2), (40, 256, 512, 4, 2)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("flags", [dict(use_tma=True), dict(use_tma=True, persistent=True), dict(persistent=True),
                                   dict(use_tma=True, persistent=True, tma_store=True), dict(persistent=True, group_m=2)],
                         ids=["tma", "tma-persistent", "persistent", "tma-persistent-store", "persistent-grouped"])
def test_tma_and_persistent_variants_match_dense_masked_float64(dtype, shape, flags):
    """The TMA-descriptor and persistent variants (autotuner choices on Hopper) under the interpreter: 64-wide N tiles
    run past the 16- and 48-wide patches, so the masked store must drop what they read from the neighbour patch; the
    persistent schedule runs 3 programs here, each walking several tiles (with the low-rank segment and bias too).
    Descriptor stores apply where a 64-wide tile fits its patch (64- and 128-wide patches, last shape); they must
    clip the 8 rows past the end of the last 32-row tile, and elsewhere fall back to the masked store. The grouped
    order walks 2 row blocks at a time; 2 or 3 row blocks here leave a last group of one or a full one."""
    torch.manual_seed(zlib.crc32(repr((dtype, shape, flags)).encode()))
    layout, weight, dense, x, grad = make_case(*shape, dtype)
    rank = 8
    u, v = torch.randn(layout.out_features, rank).to(dtype), torch.randn(rank, layout.in_features).to(dtype)
    bias = torch.randn(layout.out_features).to(dtype)
    config = MatmulConfig(32, 64, 16, 4, 1, **flags)
    y = triton_impl.butterfly_matmul(x, weight, bias, x @ v.T, u, config=config,
                                     out=torch.full((x.shape[0], layout.out_features), float("nan"), dtype=dtype))
    dx = triton_impl.butterfly_matmul_t(grad, weight, grad @ u, v, out=torch.full_like(x, float("nan")), config=config)
    dw = triton_impl.butterfly_matmul_dw(grad, x, layout.n_slots, layout.butterfly_size,
                                         out=torch.full_like(weight, float("nan")),
                                         config=DwConfig(32, 64, 16, 4, 1, use_tma=config.use_tma))
    tol = TOLERANCE[dtype] * 2  # Z and dZ are rounded to the input dtype before the segment
    full = dense + u.double() @ v.double()
    assert rel_err(y, x.double() @ full.T + bias.double()) < tol
    assert rel_err(dx, grad.double() @ full) < tol
    dw_dense = (grad.double().T @ x.double()) * dense_mask(layout)
    assert rel_err(reference.butterfly_to_dense(dw.double()), dw_dense) < tol


def test_autotuner_offers_32_wide_tiles_only_where_they_pay():
    """Without 32-wide tiles a 32-wide patch (1024 -> 4096 at butterfly size 32) would get one 64x32x32 config;
    patches that 64 divides must not pay tuning time for 32-wide tiles."""
    def offered(n_patch, k_patch, tma_aligned=True):
        args = dict(M=16384, N_PATCH=n_patch, K_PATCH=k_patch, TMA_ALIGNED=tma_aligned)
        return {(c.block_m, c.block_n, c.block_k, c.use_tma) for c in prune_matmul(MM_CONFIGS, args) if not c.flat_k}

    wide = offered(256, 64)
    assert min(min(n, k) for _, n, k, _ in wide) == 64 and (128, 256, 64, True) in wide
    narrow_k = offered(128, 32)  # its forward: 32-wide K
    assert {k for _, _, k, _ in narrow_k} == {32} and (128, 128, 32, True) in narrow_k
    narrow_n = offered(32, 128)  # its dX: 32-wide N
    assert {n for _, n, _, _ in narrow_n} == {32} and (256, 32, 64, True) in narrow_n
    assert not any(tma for *_, tma in offered(24, 96, tma_aligned=False))
    # 96-wide patches (768 -> 3072 at butterfly size 8): 64-wide K tiles would mask a quarter of the last step and
    # rule out TMA; 32-wide ones tile it exactly. 384 is 64-divisible: no 32-wide N there
    fwd_96 = offered(384, 96)
    assert (128, 256, 32, True) in fwd_96 and {n for _, n, _, _ in fwd_96} >= {128, 256} and 32 not in {n for _, n, _, _ in fwd_96}
    assert (128, 32, 64, True) in offered(96, 384)  # its dX: 32-wide N tiles 96 exactly
    # K patches no power-of-2 tile divides: 48 = 32 + a 16-wide tail step (64 would mask a quarter of a step), 80 =
    # 64 + 16; both with TMA for the whole steps. 40 leaves 8 either way: masked steps, no TMA
    fwd_48 = offered(192, 48)
    assert (128, 128, 32, True) in fwd_48 and {k for _, _, k, _ in fwd_48} == {32, 64}
    fwd_80 = offered(320, 80)
    assert (128, 256, 64, True) in fwd_80 and {k for _, _, k, _ in fwd_80} == {64}
    assert not any(tma for *_, tma in offered(160, 40))
    # K steps across slots: offered where the step does not divide the K patch (48 with 64 and 32; 160 with 64),
    # never where it does (64-wide patches)
    def flat_k_steps(n_patch, k_patch):
        kept = prune_matmul(MM_CONFIGS, dict(M=16384, N_PATCH=n_patch, K_PATCH=k_patch, TMA_ALIGNED=True))
        return {c.block_k for c in kept if c.flat_k}

    assert flat_k_steps(192, 48) == {32, 64} and flat_k_steps(640, 160) == {64} and flat_k_steps(256, 64) == set()
    assert flat_k_steps(128, 32) == {64}  # two 32-wide slots per 64-wide step
    dw = prune_dw(DW_CONFIGS, dict(M=16384, Q=128, P=32, F=3, TMA_ALIGNED=True))
    assert {(c.block_m, c.block_n, c.block_k) for c in dw} == {(128, 32, 64)}  # its dW tile (q=128, p=32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block_k", [32, 64])
@pytest.mark.parametrize("flags", [dict(), dict(use_tma=True), dict(use_tma=True, persistent=True)],
                         ids=["pointer", "tma", "tma-persistent"])
def test_k_tail_steps_match_dense_masked_float64(dtype, block_k, flags):
    """Patches 48 wide (in) and 80 wide (out): with 32-wide K steps the forward runs 32 + a 16-wide tail per slot
    and dX 2 x 32 + 16; with 64-wide ones dX runs 64 + 16 and the forward's rest (48, no power of 2) falls back to
    a masked step. The tails go by pointer loads beside TMA main steps; low rank and bias ride along."""
    torch.manual_seed(zlib.crc32(repr((dtype, block_k, flags)).encode()))
    layout, weight, dense, x, grad = make_case(29, 192, 320, 4, 2, dtype)
    assert layout.tile_shape == (80, 48)
    rank = 8
    u, v = torch.randn(layout.out_features, rank).to(dtype), torch.randn(rank, layout.in_features).to(dtype)
    bias = torch.randn(layout.out_features).to(dtype)
    config = MatmulConfig(32, 32, block_k, 4, 1, **flags)
    # 64-wide steps leave the forward's 48 as one masked step, which TMA cannot load: pointer loads there
    fwd_config = MatmulConfig(32, 32, block_k, 4, 1, **{**flags, "use_tma": False}) if block_k == 64 else config
    y = triton_impl.butterfly_matmul(x, weight, bias, x @ v.T, u, config=fwd_config,
                                     out=torch.full((x.shape[0], layout.out_features), float("nan"), dtype=dtype))
    dx = triton_impl.butterfly_matmul_t(grad, weight, grad @ u, v, out=torch.full_like(x, float("nan")), config=config)
    tol = TOLERANCE[dtype] * 2
    full = dense + u.double() @ v.double()
    assert rel_err(y, x.double() @ full.T + bias.double()) < tol
    assert rel_err(dx, grad.double() @ full) < tol
    assert k_tail(48, 32) == 16 and k_tail(80, block_k) == 16 and k_tail(48, 64) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(29, 192, 320, 4, 2), (23, 160, 80, 4, 2), (31, 128, 256, 8, 3)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("block_k", [32, 64])
def test_k_steps_across_slots_match_dense_masked_float64(dtype, shape, block_k):
    """flat_k: the slots' K patches as one range, a step taking the end of one slot and the start of the next.
    Patches 48 (in) and 80 (out) wide: the forward walks 3 x 48 = 144 in 64-wide steps (the second spans slots 0 and
    1) and dX 3 x 80; 40 and 20 wide: 8- and 4-element chunks; 16 wide with 4 slots: 32-wide steps take two whole
    slots. Low rank and bias ride along; the persistent schedule too, also with descriptor stores (the 32-wide output
    patches of the last shape take them, the others fall back to the masked store)."""
    torch.manual_seed(zlib.crc32(repr((dtype, shape, block_k)).encode()))
    layout, weight, dense, x, grad = make_case(*shape, dtype)
    rank = 8
    u, v = torch.randn(layout.out_features, rank).to(dtype), torch.randn(rank, layout.in_features).to(dtype)
    bias = torch.randn(layout.out_features).to(dtype)
    tol = TOLERANCE[dtype] * 2
    full = dense + u.double() @ v.double()
    for persistent, store in ((False, False), (True, False), (True, True)):
        config = MatmulConfig(32, 32, block_k, 4, 1, persistent=persistent, tma_store=store, flat_k=True)
        y = triton_impl.butterfly_matmul(x, weight, bias, x @ v.T, u, config=config,
                                         out=torch.full((x.shape[0], layout.out_features), float("nan"), dtype=dtype))
        dx = triton_impl.butterfly_matmul_t(grad, weight, grad @ u, v, out=torch.full_like(x, float("nan")), config=config)
        assert rel_err(y, x.double() @ full.T + bias.double()) < tol
        assert rel_err(dx, grad.double() @ full) < tol


# (flags after num_stages, block_k): TMA needs whole K steps (K = 48: 16, or 32 + a 16 tail), not one masked 64 step
WHOLE_PATCH_CASES = [pytest.param(flags, block_k, id=f"{name}-k{block_k}")
                     for name, flags in (("pointer", dict()), ("tma", dict(use_tma=True)),
                                         ("tma-persistent", dict(use_tma=True, persistent=True)),
                                         ("tma-persistent-store", dict(use_tma=True, persistent=True, tma_store=True)),
                                         ("flat-k-persistent", dict(persistent=True, flat_k=True)),
                                         ("flat-k-persistent-store", dict(persistent=True, tma_store=True, flat_k=True)))
                     for block_k in (16, 32, 64) if block_k < 64 or name == "pointer"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("flags, block_k", WHOLE_PATCH_CASES)
def test_whole_patch_column_tiles_match_dense_masked_float64(dtype, flags, block_k):
    """full_patch_n: one tile spans a patch whose width is no power of 2, as BLOCK_N columns plus a narrower
    rest in a second accumulator. Patches 96 (out) and 48 (in) wide: the forward runs 64 + 32 columns over K = 48
    (16-wide steps divide it, 32-wide ones leave a 16-wide tail, 64-wide ones one masked step), dX 32 + 16 over
    K = 96; then 80 (out) and 160 (in): 64 + 16 over K = 160, and dX 128 + 32 over K = 80. The rest's weight, low-rank
    columns, bias and store are its own code: outputs start as NaN, so a rest column left unwritten fails."""
    torch.manual_seed(zlib.crc32(repr((dtype, block_k, flags)).encode()))
    tol = TOLERANCE[dtype] * 2  # Z and dZ are rounded to the input dtype before the segment
    for shape, fwd_n, dx_n in (((37, 96, 192, 2, 1), 64, 32), ((23, 320, 160, 2, 1), 64, 128)):
        layout, weight, dense, x, grad = make_case(*shape, dtype)
        rank = 8
        u, v = torch.randn(layout.out_features, rank).to(dtype), torch.randn(rank, layout.in_features).to(dtype)
        bias = torch.randn(layout.out_features).to(dtype)
        y = triton_impl.butterfly_matmul(x, weight, bias, x @ v.T, u,
                                         config=MatmulConfig(32, fwd_n, block_k, 4, 1, **flags, full_patch_n=True),
                                         out=torch.full((x.shape[0], layout.out_features), float("nan"), dtype=dtype))
        dx = triton_impl.butterfly_matmul_t(grad, weight, grad @ u, v,
                                            config=MatmulConfig(32, dx_n, block_k, 4, 1, **flags, full_patch_n=True),
                                            out=torch.full_like(x, float("nan")))
        full = dense + u.double() @ v.double()
        assert rel_err(y, x.double() @ full.T + bias.double()) < tol, layout.tile_shape
        assert rel_err(dx, grad.double() @ full) < tol, layout.tile_shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("flags", [dict(), dict(use_tma=True), dict(split_k=2), dict(use_tma=True, split_k=3)],
                         ids=["pointer", "tma", "split2", "tma-split3"])
def test_dw_whole_patch_column_tiles_match_dense_masked_float64(dtype, flags):
    """full_patch_n in the dW kernel: one tile spans the p columns of a patch 48 (32 + 16), 160 (128 + 32) or 80
    (64 + 16) wide, the rest's X columns in a second accumulator fed by the same dY tile; alone, by TMA, and with the
    tokens split 2 or 3 ways (fp32 atomic adds). The output starts as NaN."""
    torch.manual_seed(zlib.crc32(repr((dtype, flags)).encode()))
    for shape, block_n in (((37, 96, 192, 2, 1), 32), ((23, 320, 160, 2, 1), 128), ((29, 160, 320, 2, 1), 64)):
        layout, weight, dense, x, grad = make_case(*shape, dtype)
        config = DwConfig(16, block_n, 16, 4, 1, **flags, full_patch_n=True)
        dw = triton_impl.butterfly_matmul_dw(grad, x, layout.n_slots, layout.butterfly_size,
                                             out=torch.full_like(weight, float("nan")), config=config)
        dw_dense = (grad.double().T @ x.double()) * dense_mask(layout)
        assert rel_err(reference.butterfly_to_dense(dw.double()), dw_dense) < TOLERANCE[dtype], layout.tile_shape


def test_whole_patch_column_tiles_offered_only_where_the_rest_fits():
    """The autotuner gets full_patch_n configs where the patch is block_n plus a narrower power of 2 of at least 16,
    with the two accumulators within 128 x 256 (forward/dX: the patch's output columns; dW: its p columns); an
    explicit config elsewhere is refused with the fix."""
    def offered(n_patch, k_patch=256):
        args = dict(M=16384, N_PATCH=n_patch, K_PATCH=k_patch, TMA_ALIGNED=True)
        return {(c.block_m, c.block_n) for c in prune_matmul(MM_CONFIGS, args) if c.full_patch_n}

    assert offered(160) == {(128, 128), (64, 128)}  # 128 + 32; 256-row tiles would hold 256 x 160 in registers
    assert offered(48) == {(128, 32), (256, 32)} and offered(80) == {(128, 64)} and offered(96) == {(128, 64)}
    assert offered(320) == {(64, 256)}  # 256 + 64, only 64 rows
    assert offered(128) == offered(256) == offered(24) == offered(40) == set()  # powers of 2; rests under 16
    # dW: the same rule on p, never with all slots per program (their gathered X tile has one column width)
    dw_offered = {(c.block_m, c.block_n, c.all_slots) for c in prune_dw(
        DW_SPLIT_CONFIGS, dict(M=16384, Q=640, P=160, F=3, TMA_ALIGNED=True)) if c.full_patch_n}
    assert dw_offered == {(128, 128, False), (64, 128, False)}
    # ... and only on 16-byte aligned dY and X (an illegal memory access on the H200 otherwise)
    assert not any(c.full_patch_n for c in prune_dw(DW_SPLIT_CONFIGS, dict(M=16384, Q=640, P=160, F=3, TMA_ALIGNED=False)))
    layout, weight, dense, x, grad = make_case(20, 192, 384, 4, 1, torch.float32)  # patches 48 (in), 96 (out)
    with pytest.raises(ValueError, match="patch is 96 wide: that needs block_n plus a narrower power of 2"):
        triton_impl.butterfly_matmul(x, weight, config=MatmulConfig(32, 32, 16, 4, 1, full_patch_n=True))
    with pytest.raises(ValueError, match="patch is 48 wide"):
        triton_impl.butterfly_matmul_dw(grad, x, 2, 4, config=DwConfig(32, 16, 16, 4, 1, full_patch_n=True))
    with pytest.raises(ValueError, match="all slots per program with TMA or a tile across the patch"):
        triton_impl.butterfly_matmul_dw(grad, x, 2, 4, config=DwConfig(32, 32, 16, 4, 1, all_slots=True, full_patch_n=True))
    shifted = torch.randn(20, 193)[:, 1:]  # X's base 4 bytes past an aligned one
    with pytest.raises(ValueError, match="dW tile across the patch, but dY or X is not 16-byte aligned"):
        triton_impl.butterfly_matmul_dw(grad, shifted, 2, 4, config=DwConfig(32, 32, 16, 4, 1, full_patch_n=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(83, 256, 512, 8, 2), (61, 192, 384, 4, 1), (45, 512, 256, 16, 3), (50, 128, 64, 4, 0)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("flags", [dict(all_slots=True), dict(all_slots=True, split_k=3), dict(split_k=2),
                                   dict(use_tma=True, split_k=4)], ids=["all-slots", "all-slots-split3", "split2", "tma-split4"])
def test_dw_all_slots_and_token_splits_match_dense_masked_float64(dtype, shape, flags):
    """The token-split dW kernel: one program computing all F slots from a gathered X tile (F = 3 and 2 padded
    to 4 and 2 columns blocks, F = 4 exact, F = 1), and token ranges split 2-4 ways whose partial tiles are added
    atomically in fp32 (83 tokens in 3 shares of 32, 32, 19; 4 shares of 45 leave one empty). The output starts as
    NaN: every element must be written (fp32 adds into it after zeroing it, bf16 gets a cast of an fp32 buffer)."""
    torch.manual_seed(zlib.crc32(repr((dtype, shape, flags)).encode()))
    layout, weight, dense, x, grad = make_case(*shape, dtype)
    dw = triton_impl.butterfly_matmul_dw(grad, x, layout.n_slots, layout.butterfly_size,
                                         out=torch.full_like(weight, float("nan")), config=DwConfig(16, 16, 16, 4, 1, **flags))
    dw_dense = (grad.double().T @ x.double()) * dense_mask(layout)
    assert rel_err(reference.butterfly_to_dense(dw.double()), dw_dense) < TOLERANCE[dtype]


def test_dw_token_split_only_below_a_wave_and_never_when_deterministic():
    """The launcher sends a dW shape to the split kernel only when 128 x 128 tiles leave SMs idle (1024 -> 4096 at
    butterfly size 16: 96 tiles on 132 SMs), and never under torch.use_deterministic_algorithms: atomic adds sum
    the shares in no fixed order. The split kernel's autotuner gets all-slot tiles only where they fit 128 x 256 and
    token splits only where each share keeps 1024 tokens."""
    assert triton_impl._dw_token_split(96, 132) and not triton_impl._dw_token_split(192, 132)
    torch.use_deterministic_algorithms(True)
    try:
        assert not triton_impl._dw_token_split(96, 132)
    finally:
        torch.use_deterministic_algorithms(False)

    def offered(tokens, q, p, slots):
        kept = prune_dw(DW_SPLIT_CONFIGS, dict(M=tokens, Q=q, P=p, F=slots, TMA_ALIGNED=True))
        return {(c.block_m, c.block_n, c.all_slots, c.split_k) for c in kept}

    wide = offered(16384, 256, 64, 3)  # 1024 -> 4096 at butterfly size 16: 3 slots padded to 4 x 64 columns
    assert {(64, 64, True, 4), (128, 64, True, 4), (128, 64, False, 1)} <= wide
    assert not any(all_slots and m * 4 * n > 128 * 256 for m, n, all_slots, _ in wide)
    assert {split for *_, split in offered(2000, 256, 64, 3)} == {1}
    assert not any(all_slots for _, _, all_slots, _ in offered(16384, 256, 64, 1))  # one slot: nothing to share


def test_bounds_check_stops_a_kernel_that_reads_past_its_tensor():
    """The bounds check conftest applies to every test in the interpreter (tests/bounds_check.py) must catch what the
    GPU would stop on: a masked load one element past the storage, and a store past it; a view's storage beyond the
    view is still the tensor's memory. Without that suite-wide check this test fails too."""
    @triton.jit
    def copy(x_ptr, y_ptr, n_read, n_write, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n_read, other=0.0), mask=offs < n_write)

    x, y = torch.randn(12)[:10], torch.full((10,), float("nan"))
    copy[(1,)](x, y, 12, 10, BLOCK=16)  # reads the 2 elements of x's storage past the view
    assert torch.equal(y, x)
    with pytest.raises(Exception, match="load outside every tensor of the launch"):
        copy[(1,)](x, y, 13, 10, BLOCK=16)
    with pytest.raises(Exception, match="store outside every tensor of the launch"):
        copy[(1,)](x, y, 10, 11, BLOCK=16)


def test_tma_config_refused_where_it_cannot_work():
    layout, weight, dense, x, grad = make_case(20, 192, 384, 4, 1, torch.float32)  # patches 48 wide (in), 96 (out)
    with pytest.raises(ValueError, match="block_k=64 leaves a rest of the patch width 48"):
        triton_impl.butterfly_matmul(x, weight, config=MatmulConfig(32, 32, 64, 4, 1, use_tma=True))
    shifted = torch.randn(20, 193)[:, 1:]  # base address 4 bytes past an aligned one
    with pytest.raises(ValueError, match="not 16-byte aligned"):
        triton_impl.butterfly_matmul(shifted, weight, config=MatmulConfig(32, 32, 16, 4, 1, use_tma=True))
    with pytest.raises(ValueError, match="descriptor stores, but the operands are not 16-byte aligned"):
        triton_impl.butterfly_matmul(shifted, weight, config=MatmulConfig(32, 32, 16, 4, 1, persistent=True, tma_store=True, flat_k=True))
    with pytest.raises(ValueError, match="K steps across slots"):
        triton_impl.butterfly_matmul(x, weight, config=MatmulConfig(32, 32, 16, 4, 1, use_tma=True, flat_k=True))
    with pytest.raises(ValueError, match="gathered X tile needs pointer loads"):
        triton_impl.butterfly_matmul_dw(grad, x, 2, 4, config=DwConfig(32, 32, 16, 4, 1, use_tma=True, all_slots=True))


@pytest.mark.parametrize("impl", BACKENDS)
@pytest.mark.parametrize("rank", [8, 24, 32])
def test_fused_low_rank_segment(impl, rank):
    """Y = X S^T + Z U^T and dX = dY S + dZ V with the low-rank term inside the sparse kernel."""
    torch.manual_seed(rank)
    layout, weight, dense, x, grad = make_case(45, 192, 96, 4, 2, torch.float32)
    u, v = torch.randn(96, rank), torch.randn(rank, 192)
    z, dz = x @ v.T, grad @ u
    mod = IMPLS[impl]
    kwargs = {"out": torch.full((45, 96), float("nan"))} if impl == "triton" else {}
    y = mod.butterfly_matmul(x, weight, None, z, u, **kwargs)
    kwargs = {"out": torch.full_like(x, float("nan"))} if impl == "triton" else {}
    dx = mod.butterfly_matmul_t(grad, weight, dz, v, **kwargs)
    full = dense + u.double() @ v.double()
    assert rel_err(y, x.double() @ full.T) < 1e-5
    assert rel_err(dx, grad.double() @ full) < 1e-5


@pytest.mark.gpu
def test_repeat_launches_bypass_the_autotuner_and_use_their_own_tensors(monkeypatch):
    """The second call of a shape goes straight to the compiled kernel (Triton's launch path costs more host time
    than the kernels run). It must compute with the new call's tensors, and a base address 16 bytes do not
    divide (which rules out TMA) must get a launch of its own, not the aligned one's."""
    torch.manual_seed(5)
    layout, weight, dense, _, _ = make_case(517, 640, 1280, 8, 2, torch.float32)  # odd token count, 80x160 tiles
    bs, slots = 8, 3
    w = weight.cuda().bfloat16()

    def fresh(tokens, features, misaligned=False):
        buffer = torch.empty(tokens * features + misaligned, device="cuda", dtype=torch.bfloat16)
        t = buffer[int(misaligned):].view(tokens, features)
        assert (t.data_ptr() % 16 == 0) != misaligned
        return t.copy_(torch.randn(tokens, features))

    def check_all(misaligned):
        x, g = fresh(517, 640, misaligned), fresh(517, 1280, misaligned)
        outs = [torch.full(shape, float("nan"), device="cuda", dtype=torch.bfloat16) for shape in ((517, 1280), (517, 640))]
        triton_impl.butterfly_matmul(x, w, out=outs[0])
        triton_impl.butterfly_matmul_t(g, w, out=outs[1])
        dw = triton_impl.butterfly_matmul_dw(g, x, slots, bs)
        xd, gd = x.double().cpu(), g.double().cpu()
        assert rel_err(outs[0].cpu(), xd @ dense.T) < 1e-2
        assert rel_err(outs[1].cpu(), gd @ dense) < 1e-2
        assert rel_err(dw.cpu(), reference.butterfly_matmul_dw(gd, xd, slots, bs)) < 1e-2

    check_all(misaligned=False)  # tunes, compiles, caches
    tuned = (triton_impl._butterfly_mm_tuned, triton_impl._butterfly_dw_tuned, triton_impl._butterfly_dw_split_tuned)
    for t in tuned:
        monkeypatch.setattr(t, "run", lambda *a, **k: pytest.fail("a repeat launch went through the autotuner"))
    check_all(misaligned=False)  # new tensors, same signature: cached launches only
    monkeypatch.undo()
    check_all(misaligned=True)  # new signature: through the autotuner again
    for t in tuned:
        monkeypatch.setattr(t, "run", lambda *a, **k: pytest.fail("a repeat launch went through the autotuner"))
    check_all(misaligned=True)


@pytest.mark.gpu
def test_a_cold_autotuner_key_compiles_every_config_in_threads_before_timing(monkeypatch, tmp_path):
    """A key with nothing cached on disk: every config it times was compiled by a worker thread beforehand (the
    compiles run in parallel), none by the timing loop itself, and the picked config computes right."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    jit = butterfly_mm_kernel.fn
    on_main_thread = []

    def compile_and_record(*args, **kwargs):
        on_main_thread.append(threading.current_thread() is threading.main_thread())
        return real_compile(*args, **kwargs)

    jit.device_caches[torch.cuda.current_device()]  # the JIT binds `compile` on its first use on a device
    real_compile = jit.compile
    monkeypatch.setattr(jit, "compile", compile_and_record)
    torch.manual_seed(7)
    _, weight, dense, _, _ = make_case(300, 384, 768, 4, 2, torch.float32)  # 96 x 192 patches: no other test's key
    x = torch.randn(300, 384).cuda().bfloat16()
    out = torch.full((300, 768), float("nan"), device="cuda", dtype=torch.bfloat16)
    triton_impl.butterfly_matmul(x, weight.cuda().bfloat16(), out=out)
    assert rel_err(out.cpu(), x.double().cpu() @ dense.T) < 1e-2
    timed = triton_impl._butterfly_mm_tuned.configs_timings
    assert len(timed) > 1 and len(on_main_thread) == len(timed), (len(timed), len(on_main_thread))
    assert not any(on_main_thread)


@pytest.mark.gpu
def test_the_autotuner_times_gpu_time_not_the_launch(monkeypatch, tmp_path):
    """Configs are timed as CUDA graph replays: a launch path slowed down on the host (2 ms per call, as a loaded CPU
    would) does not enter the timings, and the picked config still computes right."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    tuned = triton_impl._butterfly_mm_tuned
    real_run = tuned.fn.run

    def slow_run(*args, **kwargs):
        if not kwargs.get("warmup"):
            time.sleep(0.002)
        return real_run(*args, **kwargs)

    monkeypatch.setattr(tuned.fn, "run", slow_run)
    torch.manual_seed(8)
    _, weight, dense, _, _ = make_case(2048, 384, 768, 4, 2, torch.float32)  # 2048 tokens: a key no other test has
    x = torch.randn(2048, 384).cuda().bfloat16()
    out = torch.full((2048, 768), float("nan"), device="cuda", dtype=torch.bfloat16)
    triton_impl.butterfly_matmul(x, weight.cuda().bfloat16(), out=out)
    assert rel_err(out.cpu(), x.double().cpu() @ dense.T) < 1e-2
    timings = [t[0] for t in tuned.configs_timings.values() if t[0] != float("inf")]
    assert len(timings) > 1 and max(timings) < 1.0, timings  # ms; this product runs for microseconds
