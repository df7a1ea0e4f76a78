"""The flat block butterfly pattern: the one place its rule is written, for the linear layers' tile grids and for
attention's grid of sequence blocks alike.

Cell (i, j) of a size x size grid is kept iff i XOR j is 0 or a power of two below 2**n_factors (the identity plus
the n_factors smallest-stride butterfly factors, summed). The pattern is symmetric and every row keeps the same
n_slots = n_factors + 1 cells: row i keeps column i ^ slot_offset(s) in slot s, slot_offset = 0, 1, 2, 4, ... .
The Triton kernels compute the same offset in-kernel as (1 << s) >> 1 and call the slot count F.
"""
import torch


def n_slots(n_factors: int) -> int:
    """Cells kept per row (and per column)."""
    return n_factors + 1


def slot_offsets(n_factors: int) -> list[int]:
    """XOR offset of each slot: the identity, then strides 1, 2, 4, ..."""
    return [0] + [1 << s for s in range(n_factors)]


def partners(size: int, n_factors: int, device=None) -> torch.Tensor:
    """(size, n_slots) long tensor: the column row i keeps in slot s, i ^ slot_offset(s)."""
    return torch.arange(size, device=device).unsqueeze(1) ^ torch.tensor(slot_offsets(n_factors), device=device)


def kept(xor: torch.Tensor, n_factors: int) -> torch.Tensor:
    """Whether cells whose indices XOR to `xor` (an integer tensor, any shape) are kept."""
    return (torch.bitwise_and(xor, xor - 1) == 0) & (xor < (1 << n_factors))


def density(size: int, n_factors: int) -> float:
    """Fraction of the grid's cells kept."""
    return n_slots(n_factors) / size
