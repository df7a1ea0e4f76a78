"""Plain PyTorch implementation of the three butterfly-sparse products (the CPU path and the test oracle).

Weight layout, shared with the Triton kernels: `weight[r, j]` (r < B, j < F = n_slots) is the (q x p) tile of W
(out x in) at tile row r and tile column r ^ offset_j (butterfly_pattern.py); q = out / B, p = in / B.
Half-precision inputs are computed in fp32 and cast back, as the kernels do.
"""
import torch

from .butterfly_pattern import partners


def tile_partners(butterfly_size: int, n_slots: int, device=None) -> torch.Tensor:
    """(B, n_slots) long tensor: the input tile r ^ offset_j that output tile r reads in slot j."""
    return partners(butterfly_size, n_slots - 1, device)


def _compute_dtype(*tensors):
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def butterfly_matmul(x: torch.Tensor, weight: torch.Tensor, bias=None, z=None, lowrank_u=None) -> torch.Tensor:
    """Y = X @ S^T (+ Z @ U^T) (+ bias); x (T, in), weight (B, F, q, p), z (T, rank), U (out, rank) -> (T, out)."""
    B, F, q, p = weight.shape
    ct = _compute_dtype(x, weight)
    x_tiles = x.to(ct).reshape(-1, B, p)
    gathered = x_tiles[:, tile_partners(B, F, x.device)]  # (T, B, F, p)
    y = torch.einsum("tbfp,bfqp->tbq", gathered, weight.to(ct)).reshape(-1, B * q)
    if z is not None:
        y = y + z.to(ct) @ lowrank_u.to(ct).T
    if bias is not None:
        y = y + bias.to(ct)
    return y.to(x.dtype)


def butterfly_matmul_t(grad: torch.Tensor, weight: torch.Tensor, dz=None, lowrank_v=None) -> torch.Tensor:
    """dX = dY @ S (+ dZ @ V); grad (T, out), weight (B, F, q, p), dz (T, rank), V (rank, in) -> (T, in).

    Input tile c is read by output tile c ^ offset_j in slot j (the pattern is symmetric), so
    dX[:, c] = sum_j dY[:, c ^ offset_j] @ weight[c ^ offset_j, j].
    """
    B, F, q, p = weight.shape
    ct = _compute_dtype(grad, weight)
    partners = tile_partners(B, F, grad.device)
    grad_tiles = grad.to(ct).reshape(-1, B, q)[:, partners]  # (T, B, F, q)
    slots = torch.arange(F, device=grad.device).expand(B, F)
    w_partner = weight.to(ct)[partners, slots]  # (B, F, q, p): weight[c ^ o_j, j]
    dx = torch.einsum("tcfq,cfqp->tcp", grad_tiles, w_partner).reshape(-1, B * p)
    if dz is not None:
        dx = dx + dz.to(ct) @ lowrank_v.to(ct)
    return dx.to(grad.dtype)


def butterfly_matmul_dw(grad: torch.Tensor, x: torch.Tensor, n_slots: int, butterfly_size: int) -> torch.Tensor:
    """dW[r, j] = dY[:, r]^T @ X[:, r ^ offset_j]; grad (T, out), x (T, in) -> (B, F, q, p) in x's dtype."""
    B = butterfly_size
    ct = _compute_dtype(grad, x)
    grad_tiles = grad.to(ct).reshape(grad.shape[0], B, -1)
    x_tiles = x.to(ct).reshape(x.shape[0], B, -1)[:, tile_partners(B, n_slots, x.device)]
    return torch.einsum("tbq,tbfp->bfqp", grad_tiles, x_tiles).to(x.dtype).contiguous()


def butterfly_to_dense(weight: torch.Tensor) -> torch.Tensor:
    """The (out x in) dense matrix with the stored tiles in place and zeros elsewhere."""
    B, F, q, p = weight.shape
    dense = weight.new_zeros(B, q, B, p)
    rows = torch.arange(B, device=weight.device).unsqueeze(1).expand(B, F)
    dense[rows, :, tile_partners(B, F, weight.device)] = weight
    return dense.reshape(B * q, B * p)


def dense_to_butterfly(dense: torch.Tensor, butterfly_size: int, n_slots: int) -> torch.Tensor:
    """The stored tiles of a dense (out x in) matrix: the inverse of `butterfly_to_dense` on the pattern."""
    B = butterfly_size
    out_features, in_features = dense.shape
    tiles = dense.reshape(B, out_features // B, B, in_features // B)
    rows = torch.arange(B, device=dense.device).unsqueeze(1).expand(B, n_slots)
    return tiles[rows, :, tile_partners(B, n_slots, dense.device)].contiguous()
