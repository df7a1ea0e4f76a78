"""The autotuner's configs for the butterfly kernels (butterfly_kernels.py), as named objects, and the rules that
prune them to what a shape can use.

A config is a tile (block_m x block_n output, K steps of block_k), num_warps and num_stages (the software pipeline's
depth), and per kernel the variant flags below. The lists try on the GPU what paid on some shape in the sweeps
(docs/dev/optimisation-notes.md); pruning keeps a shape's tuning time to the configs that can pay for it.
"""
from dataclasses import dataclass
from typing import NamedTuple

import triton

from .butterfly_kernels import k_tail, rest_width


class Tile(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class MatmulConfig:
    """A forward/dX kernel config. use_tma: TMA descriptor loads (16-byte aligned operands, K tiles inside a patch);
    persistent: one program per SM walks the tiles; tma_store: descriptor stores (aligned operands); group_m: a
    persistent program's tiles go group_m row blocks at a time; flat_k: K steps across the slots (pointer loads);
    full_patch_n: one tile spans the patch as block_n columns plus a narrower power-of-2 rest."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    use_tma: bool = False
    persistent: bool = False
    tma_store: bool = False
    group_m: int = 0
    flat_k: bool = False
    full_patch_n: bool = False

    def meta(self) -> dict:
        """The kernel's constexprs this config sets."""
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k, "USE_TMA": self.use_tma,
                "PERSISTENT": self.persistent, "TMA_STORE": self.tma_store, "GROUP_M": self.group_m,
                "FLAT_K": self.flat_k, "FULL_PATCH_N": self.full_patch_n}

    def triton_config(self) -> triton.Config:
        return triton.Config(self.meta(), num_warps=self.num_warps, num_stages=self.num_stages)


@dataclass(frozen=True)
class DwConfig:
    """A dW kernel config; its tile is block_m rows of q by block_n columns of p, K runs over tokens. use_tma: TMA
    descriptor loads (aligned operands); all_slots: one program per patch computes every slot; split_k: token shares
    added atomically in fp32; full_patch_n: one tile spans the patch's p columns as block_n plus a narrower rest."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    use_tma: bool = False
    all_slots: bool = False
    split_k: int = 1
    full_patch_n: bool = False

    def meta(self) -> dict:
        """The kernel's constexprs this config sets."""
        return {"BLOCK_M": self.block_m, "BLOCK_N": self.block_n, "BLOCK_K": self.block_k, "USE_TMA": self.use_tma,
                "ALL_SLOTS": self.all_slots, "SPLIT_K": self.split_k, "FULL_PATCH_N": self.full_patch_n}

    def triton_config(self) -> triton.Config:
        return triton.Config(self.meta(), num_warps=self.num_warps, num_stages=self.num_stages)


# (rows, cols, k) tiles tried on the GPU; pruned to what the patch sizes can fill. For the dW kernel the
# rows/cols are the tile's (q, p) and k runs over tokens. The large tiles also come as TMA variants, and for the
# forward/dX kernel the largest TMA tiles also as persistent variants: the autotuner decides per shape what pays.
_TILES = [
    Tile(128, 128, 64, 8, 3), Tile(128, 128, 64, 4, 4), Tile(128, 256, 64, 8, 3), Tile(128, 256, 64, 8, 4),
    Tile(256, 128, 64, 8, 4), Tile(128, 64, 64, 4, 4), Tile(64, 128, 64, 4, 4), Tile(64, 64, 64, 4, 4),
    Tile(64, 32, 32, 4, 4),
    Tile(256, 64, 64, 8, 3),  # narrow patches (q = 64): more rows per program reuse each weight tile more
]
# patches of <= 32 rows (q = 24); too short for wgmma
_DW_SMALL_TILES = [Tile(32, 64, 64, 4, 4), Tile(32, 128, 64, 4, 4)]
# 32-wide N or K for patches that narrow (1024 -> 4096 at butterfly size 32: 32-wide input patches) or that 32 tiles
# exactly and 64 does not (96, 160); the pruning offers them only there, so other patches keep their tuning time
_NARROW_TILES = [Tile(128, 32, 64, 4, 4), Tile(256, 32, 64, 8, 4), Tile(128, 128, 32, 8, 4), Tile(128, 256, 32, 8, 4),
                 Tile(256, 128, 32, 8, 4)]
_TMA_TILES = [Tile(128, 128, 64, 8, 3), Tile(128, 256, 64, 8, 3), Tile(128, 256, 64, 8, 4), Tile(256, 128, 64, 8, 4),
              Tile(128, 64, 64, 4, 4), Tile(256, 64, 64, 8, 3)]
_PERSISTENT_TILES = [Tile(128, 128, 64, 8, 4), Tile(128, 256, 64, 8, 3), Tile(128, 256, 64, 8, 4),
                     Tile(256, 128, 64, 8, 3), Tile(128, 128, 32, 8, 4), Tile(256, 32, 64, 8, 4)]
# K steps across the slots (flat_k; pointer loads): for K patches no power-of-2 step divides
_FLAT_K_TILES = [Tile(128, 128, 64, 8, 3), Tile(128, 256, 64, 8, 3), Tile(256, 128, 64, 8, 3), Tile(128, 64, 64, 4, 4),
                 Tile(64, 128, 64, 4, 4), Tile(128, 128, 32, 8, 4)]
# one tile per patch, block_n columns plus a narrower power-of-2 rest (full_patch_n), for patch widths that are not a
# power of 2: 48 = 32 + 16, 80 = 64 + 16, 96 = 64 + 32, 160 = 128 + 32, 192 = 128 + 64, 320 = 256 + 64
_FULL_N_TILES = [Tile(128, 128, 64, 8, 3), Tile(64, 128, 64, 4, 4), Tile(128, 64, 64, 4, 4), Tile(128, 32, 64, 4, 4),
                 Tile(256, 32, 64, 8, 3), Tile(64, 256, 64, 8, 3)]
# persistent with descriptor stores: the staging buffer costs shared memory, so one stage fewer on the largest tiles
_PERSISTENT_STORE_TILES = [Tile(128, 128, 64, 8, 4), Tile(128, 256, 64, 8, 3), Tile(256, 128, 64, 8, 3),
                           Tile(128, 128, 32, 8, 4)]
# dW tiles per slot (columns) when one program computes all F slots: the accumulator is rows x (F padded to a power of
# 2) x cols, at most 128 x 256
_ALL_SLOTS_TILES = [Tile(64, 64, 64, 4, 4), Tile(128, 64, 64, 8, 3), Tile(64, 32, 64, 4, 4), Tile(128, 32, 64, 8, 4),
                    Tile(64, 128, 64, 4, 3), Tile(128, 128, 64, 8, 3)]


def _dw_configs(split_k: int, all_slots_tiles):
    """The dW tiles tried per slot (pointer loads, and TMA where the tile allows), and the all-slot ones."""
    return ([DwConfig(*t, split_k=split_k) for t in _TILES + _DW_SMALL_TILES + _NARROW_TILES]
            + [DwConfig(*t, use_tma=True, split_k=split_k) for t in _TMA_TILES + _NARROW_TILES]
            + [DwConfig(*t, all_slots=True, split_k=split_k) for t in all_slots_tiles]
            + [DwConfig(*t, full_patch_n=True, split_k=split_k) for t in _FULL_N_TILES[:4]]
            + [DwConfig(*t, use_tma=True, full_patch_n=True, split_k=split_k) for t in _FULL_N_TILES[:3]])


DW_CONFIGS = _dw_configs(1, _ALL_SLOTS_TILES[:2])
# the token-split kernel (shapes with less than a wave of tiles), its partial tiles added atomically into fp32: every
# config of the direct kernel as one share (without them three shapes lost their direct winner and got slower),
# all-slot tiles, and the per-slot tiles these shapes pick, in 2 or 4 shares
_SPLIT_TILES = [Tile(128, 64, 64, 4, 4), Tile(64, 64, 64, 4, 4), Tile(128, 128, 64, 4, 4), Tile(128, 128, 64, 8, 3),
                Tile(64, 128, 64, 4, 4), Tile(128, 32, 64, 4, 4), Tile(32, 128, 64, 4, 4)]
DW_SPLIT_CONFIGS = (_dw_configs(1, _ALL_SLOTS_TILES)
                    + [DwConfig(*t, all_slots=True, split_k=s) for t in _ALL_SLOTS_TILES for s in (2, 4)]
                    + [DwConfig(*t, split_k=s) for t in _SPLIT_TILES for s in (2, 4)]
                    + [DwConfig(128, 64, 64, 4, 4, use_tma=True, split_k=s) for s in (2, 4)])
MM_CONFIGS = ([MatmulConfig(*t) for t in _TILES + _NARROW_TILES]
              + [MatmulConfig(*t, use_tma=True) for t in _TMA_TILES + _NARROW_TILES]
              + [MatmulConfig(*t, use_tma=True, persistent=True) for t in _PERSISTENT_TILES]
              + [MatmulConfig(*t, use_tma=True, persistent=True, tma_store=True) for t in _PERSISTENT_STORE_TILES]
              # the usual persistent winners again, walking 8 row blocks across all patches at a time
              + [MatmulConfig(*t, use_tma=True, persistent=True, tma_store=store, group_m=8)
                 for t, store in ((Tile(128, 256, 64, 8, 4), False), (Tile(256, 128, 64, 8, 3), False),
                                  (Tile(128, 256, 64, 8, 3), True))]
              + [MatmulConfig(*t, flat_k=True) for t in _FLAT_K_TILES]
              # the same K walk in persistent programs, whose descriptor stores let the next tile's loads run
              + [MatmulConfig(*t, persistent=True, tma_store=store, flat_k=True)
                 for t, store in ((Tile(128, 128, 64, 8, 3), False), (Tile(128, 128, 64, 8, 3), True),
                                  (Tile(128, 256, 64, 8, 3), True))]
              + [MatmulConfig(*t, full_patch_n=True) for t in _FULL_N_TILES]
              + [MatmulConfig(*t, use_tma=True, full_patch_n=True) for t in _FULL_N_TILES[:3]]
              + [MatmulConfig(128, 128, 64, 8, 4, use_tma=True, persistent=True, full_patch_n=True),
                 MatmulConfig(128, 128, 64, 8, 3, use_tma=True, persistent=True, tma_store=True, full_patch_n=True)]
              + [MatmulConfig(*t, flat_k=True, full_patch_n=True) for t in _FULL_N_TILES[:4]])


def whole_k_tiles(patch_k: int, block_k: int) -> bool:
    """Every K tile of a full-width step stays inside its patch (what TMA loads need)."""
    return patch_k % block_k == 0 or k_tail(patch_k, block_k) > 0


def _fits(c, rows: int, cols: int, k: int, k_patch: int | None = None, flat_k: bool = False) -> bool:
    """The tile no larger than the next power of 2 of what it covers, and 32 wide only where the patch is that
    narrow, or where 32 divides it and 64 does not (96- and 160-wide patches: no masked waste, and TMA becomes
    possible), or (K of the forward/dX, k_patch given) where 32 leaves a tail step and 64 does not (48 = 32 + 16);
    whole-patch column tiles only where the patch is block_n plus a narrower power of 2 and the two accumulators stay
    within 128 x 256; K steps across slots (flat_k) only where the step does not divide the K patch."""
    def ok(tile, size, is_k=False):
        tail_pays = is_k and k_patch is not None and k_tail(size, 32) > 0 and k_tail(size, 64) == 0
        narrow_pays = size <= 32 or (size % 64 != 0 and (size % 32 == 0 or tail_pays))
        return tile <= max(16, triton.next_power_of_2(size)) and (tile >= 64 or narrow_pays)

    if not ok(c.block_m, rows):
        return False
    if c.full_patch_n:
        if not rest_width(cols, c.block_n) or c.block_m * cols > 128 * 256:
            return False
    elif not ok(c.block_n, cols):
        return False
    if flat_k:
        return k_patch % c.block_k != 0
    return ok(c.block_k, k, is_k=True)


def _smallest(configs):
    # nothing fits (tiny patches): the smallest pointer-load tile wastes the least
    return min((c for c in configs if not c.use_tma), key=lambda c: c.block_m * c.block_n)


def prune_matmul(configs: list[MatmulConfig], named_args: dict) -> list[MatmulConfig]:
    """The forward/dX configs a shape can use (named_args: the kernel's M, N_PATCH, K_PATCH, TMA_ALIGNED): tiles that
    fit (_fits); TMA loads only on 16-byte aligned operands with K tiles inside a patch; descriptor stores only on
    aligned operands with column tiles inside a patch."""
    m, n_patch, k_patch, aligned = (named_args[a] for a in ("M", "N_PATCH", "K_PATCH", "TMA_ALIGNED"))

    def ok(c):
        return (_fits(c, m, n_patch, k_patch, k_patch=k_patch, flat_k=c.flat_k)
                and (not c.use_tma or (aligned and whole_k_tiles(k_patch, c.block_k)))
                and (not c.tma_store or (aligned and (c.full_patch_n or n_patch % c.block_n == 0))))

    return [c for c in configs if ok(c)] or [_smallest(configs)]


def prune_dw(configs: list[DwConfig], named_args: dict) -> list[DwConfig]:
    """The dW configs a shape can use (named_args: M, Q, P, F, TMA_ALIGNED): tiles that fit (_fits) and TMA loads
    only on aligned operands; all-slot tiles only where there are several slots and the accumulator stays within
    128 x 256; token splits only where each share keeps at least 1024 tokens; whole-patch tiles only on 16-byte
    aligned operands."""
    m, q, p, aligned = (named_args[a] for a in ("M", "Q", "P", "TMA_ALIGNED"))
    slots = triton.next_power_of_2(named_args["F"])

    def shape_ok(c):
        if c.all_slots and (slots == 1 or c.use_tma or c.full_patch_n or c.block_m * slots * c.block_n > 128 * 256):
            return False
        # On an H200 with Triton 3.6 a whole-patch tile (80 = 64 + 16) on a dY/X base 2 bytes past 16-byte alignment
        # stopped with an illegal memory access; the same config on aligned operands, and the forward/dX kernels'
        # whole-patch tiles on misaligned inputs, ran right. The interpreter finds every address in bounds
        # (tests/bounds_check.py), and the sm_90 code read on CPU (2-byte loads, no pipelining; the rest's X tile
        # reuses the main one's shared buffer after a wgmma wait) shows no fault. Not root-caused: such operands get
        # the other tiles.
        if c.full_patch_n and not aligned:
            return False
        return m // c.split_k >= 1024 or c.split_k == 1

    kept = [c for c in configs if shape_ok(c)] or configs[:1]
    return [c for c in kept if _fits(c, q, p, m) and (not c.use_tma or aligned)] or [_smallest(kept)]
