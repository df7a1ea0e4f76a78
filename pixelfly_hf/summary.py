"""The sparsity summary of a model: params and matrix FLOPs per token, dense vs Pixelfly, per replaced matrix.

A leaf above layers/: models/ and mapping.py both use it, so it imports neither.
"""
from __future__ import annotations

from torch import nn

from .layers import PixelflyLinear


def sparsity_summary(model: nn.Module) -> dict:
    """Params and matrix FLOPs per token, dense vs Pixelfly, for the whole model and per replaced matrix."""
    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, PixelflyLinear):
            continue
        dense = module.num_params_dense
        ours = module.num_params_structured + (module.gate.weight.numel() if module.gate is not None else 0)
        layers.append({
            "name": name,
            "in_features": module.in_features,
            "out_features": module.out_features,
            "layout": module.layout.describe(),
            "butterfly_size": module.butterfly_size,
            "n_factors": module.n_factors,
            "rank": module.rank,
            "density": ours / dense,
            "params_dense": dense,
            "params_pixelfly": ours,
            "flops_per_token_dense": 2 * dense,
            "flops_per_token_pixelfly": 2 * ours,
            "flops_per_token_saved": 2 * (dense - ours),
            "projection_error": module.projection_error,
        })
    total = sum(p.numel() for p in model.parameters())
    matrices_dense = sum(row["params_dense"] for row in layers)
    matrices_ours = sum(row["params_pixelfly"] for row in layers)
    return {
        "layers": layers,
        "replaced_matrices": len(layers),
        "matrix_params_dense": matrices_dense,
        "matrix_params_pixelfly": matrices_ours,
        "density": matrices_ours / matrices_dense if matrices_dense else 1.0,
        "total_params_dense": total - matrices_ours + matrices_dense,
        "total_params_pixelfly": total,
        "total_density": total / (total - matrices_ours + matrices_dense),
        "flops_per_token_dense": 2 * matrices_dense,
        "flops_per_token_pixelfly": 2 * matrices_ours,
        "flops_per_token_saved": 2 * (matrices_dense - matrices_ours),
    }


def format_sparsity_summary(summary: dict) -> str:
    """One row per replaced matrix, columns named as in PixelflyConfig (butterfly_size: tiles per side of the
    grid, not the kernel's block_size), then the totals."""
    width = max([len("module"), *(len(row["name"]) for row in summary["layers"])])
    header = (f"{'module':<{width}} {'in->out':^12} {'butterfly_size':>14} {'n_factors':>9} {'rank':>4} "
              f"{'density':>8} {'params':>19} {'MFLOP/tok saved':>15}")
    lines = [header, "-" * len(header)]
    for row in summary["layers"]:
        lines.append(
            f"{row['name']:<{width}} {row['in_features']:>5}->{row['out_features']:<5} {row['butterfly_size']:>14} "
            f"{row['n_factors']:>9} {row['rank']:>4} {row['density']:>8.2%} "
            f"{row['params_pixelfly']:>9,}/{row['params_dense']:<9,} {row['flops_per_token_saved'] / 1e6:>15.3f}"
        )
    lines.append("-" * len(header))
    lines.append(
        f"{summary['replaced_matrices']} matrices replaced: {summary['matrix_params_pixelfly']:,} of "
        f"{summary['matrix_params_dense']:,} params ({summary['density']:.2%}); whole model "
        f"{summary['total_params_pixelfly']:,} vs {summary['total_params_dense']:,} dense "
        f"({summary['total_density']:.2%}); matrix FLOPs per token {summary['flops_per_token_pixelfly']:,} vs "
        f"{summary['flops_per_token_dense']:,} dense, {summary['flops_per_token_saved']:,} saved."
    )
    return "\n".join(lines)
