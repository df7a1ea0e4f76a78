"""Flat block butterfly layouts and the density-budget planner.

A weight W (out x in) is cut into a butterfly_size x butterfly_size grid of tiles of shape
(out / butterfly_size) x (in / butterfly_size), kept by the flat block butterfly rule (pixelfly_kernels'
butterfly_pattern.py, its one owner): every tile row keeps n_slots = n_factors + 1 tiles. Nothing here knows about
torch modules.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from pixelfly_kernels import butterfly_pattern

from .config import check_block_size, check_butterfly_size, check_count, check_density, check_n_factors


# the paper's rank: the most the planner picks when none is asked for
DEFAULT_RANK = 32


@dataclass(frozen=True)
class FlatButterflyLayout:
    """The tile layout of one (out_features x in_features) matrix. Validates on construction."""

    out_features: int
    in_features: int
    butterfly_size: int
    n_factors: int
    block_size: int = 32

    def __post_init__(self):
        bs = self.butterfly_size
        check_butterfly_size(bs)
        check_n_factors(self.n_factors, bs)
        check_block_size(self.block_size)
        dims = (("out_features", self.out_features), ("in_features", self.in_features))
        for name, features in dims:
            if features % bs:
                raise ValueError(
                    f"{name}={features} is not divisible by butterfly_size={bs}; pick a butterfly_size "
                    f"that divides it (largest power of 2 dividing it: {features & -features})."
                )
        for name, features in dims:
            if features // bs < self.block_size:
                widest = 1 << max(0, (features // self.block_size).bit_length() - 1)
                raise ValueError(
                    f"{name}={features} with butterfly_size={bs} gives tiles {features // bs} wide, smaller "
                    f"than block_size={self.block_size}; use butterfly_size <= {widest} or a smaller block_size."
                )

    @property
    def n_slots(self) -> int:
        """Tiles kept per tile row (and column): n_factors + 1."""
        return butterfly_pattern.n_slots(self.n_factors)

    @property
    def tile_shape(self) -> tuple[int, int]:
        """(rows, cols) of one tile: (out / butterfly_size, in / butterfly_size)."""
        return self.out_features // self.butterfly_size, self.in_features // self.butterfly_size

    @property
    def density(self) -> float:
        """Fraction of the dense matrix's entries that are stored: (n_factors + 1) / butterfly_size."""
        return butterfly_pattern.density(self.butterfly_size, self.n_factors)

    @property
    def num_params(self) -> int:
        q, p = self.tile_shape
        return self.butterfly_size * self.n_slots * q * p

    def input_tiles(self) -> torch.Tensor:
        """(butterfly_size, n_slots) long tensor: input tile read by output tile r in slot j."""
        return butterfly_pattern.partners(self.butterfly_size, self.n_factors)

    def tile_mask(self) -> torch.Tensor:
        """(butterfly_size, butterfly_size) bool tensor, True where a tile is stored."""
        mask = torch.zeros(self.butterfly_size, self.butterfly_size, dtype=torch.bool)
        mask.scatter_(1, self.input_tiles(), True)
        return mask

    def element_mask(self) -> torch.Tensor:
        """(out_features, in_features) bool tensor, True on stored entries."""
        q, p = self.tile_shape
        return self.tile_mask().repeat_interleave(q, 0).repeat_interleave(p, 1)

    def describe(self) -> str:
        q, p = self.tile_shape
        return (
            f"flat butterfly {self.butterfly_size}x{self.butterfly_size}, {self.n_factors} factors, "
            f"tiles {q}x{p}, density {self.density:.2%}"
        )


def validate_rank(rank: int, out_features: int, in_features: int) -> None:
    check_count("rank", rank, limit=min(out_features, in_features),
                hint=" = [0, min(in_features, out_features)]; use 0 to disable the low-rank term")


@dataclass(frozen=True)
class MatrixPlan:
    """What the planner chose for one matrix, with the numbers behind the choice."""

    out_features: int
    in_features: int
    butterfly_size: int
    n_factors: int
    rank: int
    block_size: int
    budget: float

    @property
    def layout(self) -> FlatButterflyLayout:
        return FlatButterflyLayout(
            self.out_features, self.in_features, self.butterfly_size, self.n_factors, self.block_size
        )

    @property
    def dense_params(self) -> int:
        return self.out_features * self.in_features

    @property
    def params(self) -> int:
        """Stored weights: sparse tiles + low-rank factors (bias and gate not counted)."""
        return self.layout.num_params + self.rank * (self.out_features + self.in_features)

    @property
    def density(self) -> float:
        """Parameters (= multiply-adds per token) as a fraction of the dense matrix, low rank included."""
        return self.params / self.dense_params

    @property
    def sparse_density(self) -> float:
        return self.layout.density

    def summary(self) -> str:
        q, p = self.layout.tile_shape
        return (
            f"{self.in_features}->{self.out_features}: butterfly_size={self.butterfly_size} "
            f"n_factors={self.n_factors} (tiles {q}x{p}, sparse {self.sparse_density:.2%}) + rank {self.rank} "
            f"= {self.density:.2%} of dense (budget {self.budget:.2%})"
        )


def _candidate_layouts(out_features: int, in_features: int, block_size: int):
    """Every valid (butterfly_size, n_factors) for this shape and minimum tile edge."""
    bs = 2
    while out_features // bs >= block_size and in_features // bs >= block_size:
        if out_features % bs == 0 and in_features % bs == 0:
            for k in range(int(math.log2(bs)) + 1):
                yield bs, k
        bs *= 2


def _smallest_sparse(out_features: int, in_features: int, block_size: int) -> int | None:
    """Parameters of the sparsest valid layout at this minimum tile edge (None: no layout has tiles that wide)."""
    sizes = [(k + 1) * out_features * in_features // bs for bs, k in _candidate_layouts(out_features, in_features, block_size)]
    return min(sizes, default=None)


def _densest_layout(candidates, dense: int, sparse_budget: float) -> tuple[int, int] | None:
    """The (butterfly_size, n_factors) among `candidates` whose sparse part spends the most of `sparse_budget`
    parameters without exceeding it; ties go to the larger tiles (the kernel is faster on wide tiles), then to
    fewer factors. None when even the sparsest exceeds it."""
    fitting = [(bs, k) for bs, k in candidates if (k + 1) * dense // bs <= sparse_budget]
    return max(fitting, key=lambda c: ((c[1] + 1) * dense // c[0], -c[0], -c[1]), default=None)


def plan_matrix(
    out_features: int,
    in_features: int,
    density: float,
    *,
    block_size: int = 32,
    rank: int | None = None,
    name: str | None = None,
) -> MatrixPlan:
    """Pick (butterfly_size, n_factors, rank) for one matrix within a density budget.

    `density` is the budget as a fraction of the dense matrix's parameters, low rank included. A requested `rank`
    is kept when it fits beside the sparsest layout; otherwise it is lowered to the largest multiple of 8 that
    fits, with a warning naming the matrix (`name`, else its shape), the density or block_size that would keep it.
    With `rank` None the planner picks it, silently: the largest multiple of 8 up to the paper's DEFAULT_RANK whose
    plan keeps at least one butterfly factor, else (no such plan fits) the largest that fits. Among layouts that
    fit beside the rank, the densest sparse part wins (it spends the budget); ties go to the larger tiles (the
    kernel is faster on wide tiles), then to fewer factors. Deterministic.
    """
    check_density(density)
    if rank is not None:
        validate_rank(rank, out_features, in_features)
    candidates = list(_candidate_layouts(out_features, in_features, block_size))
    if not candidates:
        raise ValueError(
            f"no flat butterfly layout of {in_features}->{out_features} has tiles of at least "
            f"block_size={block_size}: use a smaller block_size (16) or leave this matrix dense."
        )
    dense = out_features * in_features
    budget_params = density * dense
    smallest_sparse = _smallest_sparse(out_features, in_features, block_size)
    room = budget_params - smallest_sparse
    if room < 0:
        raise ValueError(
            f"density={density} is below the sparsest layout available for {in_features}->{out_features} "
            f"with block_size={block_size} ({smallest_sparse / dense:.2%}); raise density or lower block_size."
        )
    per_rank = out_features + in_features
    affordable = int(room // per_rank)
    if rank is None:
        ranks = range(min(DEFAULT_RANK, affordable) // 8 * 8, -1, -8)
        rank = next((r for r in ranks if _densest_layout(candidates, dense, budget_params - r * per_rank)[1] > 0),
                    ranks[0])
    elif rank > affordable:
        lowered = affordable // 8 * 8
        _warn_rank_lowered(name or f"{in_features}->{out_features}", rank, lowered, density, block_size,
                           (smallest_sparse + rank * per_rank) / dense, out_features, in_features)
        rank = lowered
    bs, k = _densest_layout(candidates, dense, budget_params - rank * per_rank)
    return MatrixPlan(out_features, in_features, bs, k, rank, block_size, float(density))


def _warn_rank_lowered(name, rank, lowered, density, block_size, density_needed, out_features, in_features):
    fixes = [f"raise density to {math.ceil(density_needed * 1000) / 1000:g}"] if density_needed <= 1 else []
    smaller = block_size // 2
    while smaller >= 16:
        sparse = _smallest_sparse(out_features, in_features, smaller)
        if sparse is not None and sparse + rank * (out_features + in_features) <= density * out_features * in_features:
            fixes.append(f"lower block_size to {smaller}")
            break
        smaller //= 2
    fixes.append(f"pass low_rank={lowered} to accept it")
    warnings.warn(
        f"{name}: low_rank={rank} does not fit density={density} with block_size={block_size} (the sparsest layout "
        f"alone takes {_smallest_sparse(out_features, in_features, block_size) / (out_features * in_features):.2%} "
        f"of dense); using rank {lowered}. To keep rank {rank}: " + ", or ".join(fixes) + ".",
        UserWarning,
        stacklevel=3,
    )
