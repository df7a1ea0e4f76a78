"""PixelflyLinear: y = S x + U V x + b, S a flat block butterfly sparse matrix stored tile by tile.

With `gate=True` the two terms are mixed per token as in the reference code,
y = (1 - g) S x + g U V x + b with g = sigmoid(w . x + c).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from pixelfly_kernels.ops import BACKENDS, butterfly_linear
from pixelfly_kernels.reference import butterfly_to_dense, dense_to_butterfly, tile_partners

from ..patterns import FlatButterflyLayout, validate_rank

_BACKEND_CHOICES = ("auto",) + BACKENDS


def dense_weight_of(module: nn.Module) -> torch.Tensor:
    """The (out x in) weight of an nn.Linear or a transformers Conv1D (which stores it as in x out)."""
    if isinstance(module, nn.Linear):
        return module.weight
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return module.weight.t()
    raise TypeError(f"expected an nn.Linear or transformers Conv1D, got {type(module).__name__}")


class PixelflyLinear(nn.Module):
    """Drop-in replacement for nn.Linear with a flat block butterfly sparse weight plus a low-rank term.

    Parameters: `weight` (butterfly_size, n_factors + 1, out/butterfly_size, in/butterfly_size) holds only the
    nonzero tiles; `lowrank_u` (out, rank) and `lowrank_v` (rank, in) when rank > 0; `bias` (out,); `gate`
    (nn.Linear(in, 1)) when gate=True. backend: "auto" (Triton on CUDA tensors, the PyTorch reference
    elsewhere), "triton" (CUDA, or CPU under TRITON_INTERPRET=1) or "reference".
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        butterfly_size: int,
        n_factors: int,
        rank: int = 0,
        block_size: int = 32,
        gate: bool = False,
        backend: str = "auto",
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.layout = FlatButterflyLayout(out_features, in_features, butterfly_size, n_factors, block_size)
        validate_rank(rank, out_features, in_features)
        if backend not in _BACKEND_CHOICES:
            raise ValueError(f"backend={backend!r} must be one of {_BACKEND_CHOICES}")
        self.in_features, self.out_features, self.rank, self.backend = in_features, out_features, rank, backend
        factory = {"device": device, "dtype": dtype}
        q, p = self.layout.tile_shape
        self.weight = nn.Parameter(torch.empty(butterfly_size, n_factors + 1, q, p, **factory))
        if rank:
            self.lowrank_u = nn.Parameter(torch.empty(out_features, rank, **factory))
            self.lowrank_v = nn.Parameter(torch.empty(rank, in_features, **factory))
        else:
            self.register_parameter("lowrank_u", None)
            self.register_parameter("lowrank_v", None)
        self.gate = nn.Linear(in_features, 1, **factory) if gate else None
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.projection_error: float | None = None
        self.reset_parameters()

    @property
    def butterfly_size(self) -> int:
        return self.layout.butterfly_size

    @property
    def n_factors(self) -> int:
        return self.layout.n_factors

    @property
    def block_size(self) -> int:
        return self.layout.block_size

    @torch.no_grad()
    def reset_parameters(self):
        """nn.Linear's init, with the sparse tiles scaled so the output variance matches the dense layer's.

        nn.Linear draws U(+-1/sqrt(in)); a row of S sums only (n_factors + 1) of butterfly_size input tiles,
        so its tiles draw U(+-sqrt(butterfly_size / (n_factors + 1) / in)). The low-rank term starts at zero
        (U = 0, as LoRA does) so it adds no variance; V gets nn.Linear's range so U's gradient is nonzero.
        """
        bound = 1.0 / math.sqrt(self.in_features)
        self.weight.uniform_(-bound, bound).mul_(math.sqrt(1.0 / self.layout.density))
        if self.rank:
            self.lowrank_v.uniform_(-bound, bound)
            self.lowrank_u.zero_()
        if self.gate is not None:
            self.gate.weight.zero_()  # g = 0.5 until trained
            self.gate.bias.zero_()
        if self.bias is not None:
            self.bias.uniform_(-bound, bound)

    def _resolve_backend(self, x: torch.Tensor) -> str:
        if self.backend == "auto":
            return "triton" if x.is_cuda else "reference"
        return self.backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features in its last dimension; expected {self.in_features}")
        lead_shape = x.shape[:-1]
        device_type = x.device.type
        # the kernels get no autocast rule: cast to the autocast dtype here, as F.linear would
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        x2 = x.reshape(-1, self.in_features).to(dtype)
        bias = self.bias.to(dtype) if self.bias is not None else None
        backend = self._resolve_backend(x)
        weight = self.weight.to(dtype)
        u = self.lowrank_u.to(dtype) if self.rank else None
        v = self.lowrank_v.to(dtype) if self.rank else None
        if self.gate is None:
            y, _ = butterfly_linear(x2, weight, bias, u, v, backend)
        else:
            sparse, _ = butterfly_linear(x2, weight, None, None, None, backend)
            g = torch.sigmoid(F.linear(x2, self.gate.weight.to(dtype), self.gate.bias.to(dtype)))
            y = torch.lerp(sparse, F.linear(F.linear(x2, v), u), g) if self.rank else sparse * (1 - g)
            if bias is not None:
                y = y + bias
        return y.reshape(*lead_shape, self.out_features)

    def to_dense(self) -> torch.Tensor:
        """The (out x in) matrix this layer applies: sparse tiles in place plus U V (needs gate=False)."""
        if self.gate is not None:
            raise ValueError(
                "to_dense() is undefined with gate=True: the gate mixes the terms per input token, so the layer "
                "is not one matrix. Build the layer with gate=False to export a dense weight."
            )
        dense = butterfly_to_dense(self.weight)
        if self.rank:
            dense = dense + self.lowrank_u @ self.lowrank_v
        return dense

    @torch.no_grad()
    def project_(self, dense: torch.Tensor, n_iter: int = 3, input_covariance: torch.Tensor | None = None,
                 cross_covariance: torch.Tensor | None = None) -> float:
        """Set S + U V to the best fit of `dense` (out x in) and return its relative error.

        Without `input_covariance` the fit minimises the Frobenius error ||W - S - U V||: it alternates the two
        exact minimisers, S = W - U V on the pattern and U V = the rank-r truncated SVD of W - S.

        With `input_covariance` C = E[x x^T] (in x in) of the layer's inputs it minimises the error of the outputs
        on those inputs, ||(W - S - U V) C^(1/2)||, and returns that relative error (under C itself): per tile row, S solves the
        normal equations over its (n_factors + 1) input tiles, S_J C_JJ = (W - U V) C_:J; U V is the truncated SVD
        in the whitened space, (W - S) L -> U V L with C = L L^T. Directions the inputs rarely take cost little
        there, so the fit spends the parameters where the outputs need them. C is damped by 1% of its mean
        diagonal, which keeps the solves well posed where calibration data leave directions unseen.

        `cross_covariance` E[x_d x^T] pairs each input x with the input x_d the dense matrix saw for the same token
        (they differ once earlier layers are projected): the fit then minimises E||(S + U V) x - W x_d||^2, i.e.
        fits T = W E[x_d x^T] C^-1 under C, so the layer makes up for the error of the layers before it. The
        damping adds lambda I to both covariances (a pull toward W), so with x_d = x, T = W. The returned error is
        then ||(T - S - U V) C^(1/2)|| / ||T C^(1/2)||: against the best any matrix could do on these inputs.

        With the gate on, the gate starts at g = 0.5 and both terms are doubled, so the layer equals S + U V.
        """
        if dense.shape != (self.out_features, self.in_features):
            raise ValueError(f"dense weight has shape {tuple(dense.shape)}; expected {(self.out_features, self.in_features)}")
        target = dense.detach().to(torch.float32)
        raw = cov = chol = None
        if input_covariance is not None:
            raw, cov = self._damped_covariance(input_covariance, target.device)
            chol = torch.linalg.cholesky(cov)
            if cross_covariance is not None:
                cross = self._checked_covariance("cross_covariance", cross_covariance, target.device) + (cov - raw)
                target = torch.cholesky_solve(cross.T @ target.T, chol).T  # W (C_dx + lambda I) (C + lambda I)^-1
        elif cross_covariance is not None:
            raise ValueError("cross_covariance pairs with the layer's own input_covariance; pass both, or neither to "
                             "fit the weights")
        low = torch.zeros_like(target)
        for _ in range(max(1, n_iter)):
            tiles = self._fit_tiles(target - low, cov)
            if not self.rank:  # without a low-rank term, this fit of the tiles is already the exact minimiser
                break
            lr_u, lr_v = self._low_rank_fit(target - butterfly_to_dense(tiles), chol)
            low = lr_u @ lr_v
        error = target - butterfly_to_dense(tiles) - low
        if raw is None:
            error = torch.linalg.norm(error) / torch.linalg.norm(target).clamp_min(1e-30)
        else:  # ||E C^(1/2)|| / ||W C^(1/2)|| under the covariance as given, without the damping
            error = ((error @ raw * error).sum() / (target @ raw * target).sum().clamp_min(1e-30)).clamp_min(0).sqrt()
        scale = 2.0 if self.gate is not None else 1.0
        self.weight.copy_(tiles * scale)
        if self.rank:
            self.lowrank_u.copy_(lr_u * scale)
            self.lowrank_v.copy_(lr_v)
        if self.gate is not None:
            self.gate.weight.zero_()
            self.gate.bias.zero_()
        self.projection_error = float(error)
        return self.projection_error

    def _damped_covariance(self, covariance: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(C as given, symmetrised; C damped by 1% of its mean diagonal), in float32."""
        cov = self._checked_covariance("input_covariance", covariance, device)
        cov = (cov + cov.T) / 2
        damping = 0.01 * cov.diagonal().mean().clamp_min(1e-12)
        return cov, cov + damping * torch.eye(self.in_features, device=device)

    def _checked_covariance(self, what: str, covariance: torch.Tensor, device) -> torch.Tensor:
        if covariance.shape != (self.in_features, self.in_features):
            raise ValueError(f"{what} has shape {tuple(covariance.shape)}; expected "
                             f"{(self.in_features, self.in_features)}, a second moment of the layer's inputs")
        return covariance.detach().to(device=device, dtype=torch.float32)

    def _fit_tiles(self, residual: torch.Tensor, cov: torch.Tensor | None) -> torch.Tensor:
        """The tiles S minimising ||residual - S||, which keeps residual's tiles, or with a covariance
        ||(residual - S) C^(1/2)||: tile row r reads the input columns J_r of its partner tiles, and
        S_r[:, J_r] = residual_r C[:, J_r] C[J_r, J_r]^-1."""
        B, Fs = self.butterfly_size, self.layout.n_slots
        if cov is None:
            return dense_to_butterfly(residual, B, Fs)
        q, p = self.layout.tile_shape
        columns = (tile_partners(B, Fs, cov.device)[:, :, None] * p + torch.arange(p, device=cov.device)).reshape(B, -1)
        gram = cov[columns[:, :, None], columns[:, None, :]]  # (B, F p, F p)
        rhs = (residual @ cov).reshape(B, q, -1).gather(2, columns[:, None, :].expand(B, q, -1))  # (B, q, F p)
        solved = torch.linalg.solve(gram, rhs.transpose(1, 2)).transpose(1, 2)  # gram is symmetric
        return solved.reshape(B, q, Fs, p).transpose(1, 2).contiguous()

    def _low_rank_fit(self, residual: torch.Tensor, chol: torch.Tensor | None):
        """(U, V), the rank-r minimiser of ||(residual - U V) L|| (L = I without a covariance), split as
        U = u sqrt(s), V = sqrt(s) v^T L^-1 from the SVD of residual L."""
        whitened = residual if chol is None else residual @ chol
        u, s, vh = torch.linalg.svd(whitened, full_matrices=False)
        root = s[: self.rank].sqrt()
        v = root[:, None] * vh[: self.rank]
        if chol is not None:  # v L^-1: solve X L = v
            v = torch.linalg.solve_triangular(chol, v, upper=False, left=False)
        return u[:, : self.rank] * root, v

    @classmethod
    def from_dense(
        cls,
        module: nn.Module,
        *,
        butterfly_size: int,
        n_factors: int,
        rank: int = 0,
        block_size: int = 32,
        gate: bool = False,
        n_iter: int = 3,
        backend: str = "auto",
        input_covariance: torch.Tensor | None = None,
        cross_covariance: torch.Tensor | None = None,
    ) -> "PixelflyLinear":
        """A PixelflyLinear projected from an nn.Linear or Conv1D (see project_; `input_covariance` fits the outputs
        on the layer's inputs instead of the weights, `cross_covariance` the dense outputs on other inputs); the
        fit's error is in `.projection_error`."""
        weight = dense_weight_of(module)
        out_features, in_features = weight.shape
        layer = cls(
            in_features, out_features, bias=module.bias is not None, butterfly_size=butterfly_size,
            n_factors=n_factors, rank=rank, block_size=block_size, gate=gate, backend=backend,
            device=weight.device, dtype=weight.dtype,
        )
        layer.project_(weight, n_iter=n_iter, input_covariance=input_covariance, cross_covariance=cross_covariance)
        if module.bias is not None:
            with torch.no_grad():
                layer.bias.copy_(module.bias)
        return layer

    @property
    def num_params_dense(self) -> int:
        return self.in_features * self.out_features

    @property
    def num_params_structured(self) -> int:
        """Stored matrix weights (sparse tiles + low rank), the multiply-adds per token."""
        return self.layout.num_params + self.rank * (self.in_features + self.out_features)

    @property
    def density(self) -> float:
        return self.num_params_structured / self.num_params_dense

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, {self.layout.describe()}, "
            f"rank={self.rank}, gate={self.gate is not None}, bias={self.bias is not None}, "
            f"total density {self.density:.2%}, backend={self.backend}"
        )
