"""Swapping a model's planned dense matrices for PixelflyLinear layers.

A Pixelfly model's config carries `pixelfly = {"config": <PixelflyConfig dict>, "base_model": <id or path>,
"modules": {name: {in_features, out_features, butterfly_size, n_factors, rank, block_size, gate}}}`, module
names relative to the base model (`model.base_model`), so every head class of one architecture shares it.
"""
from __future__ import annotations

from torch import nn

from ..layers import PixelflyLinear, dense_weight_of


def install_pixelfly_layers(root: nn.Module, modules: dict[str, dict], *, project: bool, n_iter: int = 3,
                            input_covariances: dict | None = None, cross_covariances: dict | None = None) -> None:
    """Replace each planned nn.Linear / Conv1D under `root` with a PixelflyLinear of the planned structure.

    project=True fits the dense weights, or with `input_covariances` (name -> E[x x^T], calibration.py) the
    outputs on those inputs, and with `cross_covariances` (name -> E[x_dense x^T]) the dense outputs on the inputs
    the dense model sent (the fit's error lands in each layer's `.projection_error`); otherwise
    the layer is built on the dense weight's device and dtype with its own random init (on the meta device
    while transformers builds a model to load weights into).
    """
    for name, spec in modules.items():
        parent_name, _, child = name.rpartition(".")
        try:
            dense = root.get_submodule(name)
            weight = dense_weight_of(dense)
        except (AttributeError, TypeError) as err:
            raise ValueError(
                f"the Pixelfly plan names module {name!r}, but the model has no nn.Linear/Conv1D there ({err}); "
                "the config's pixelfly['modules'] does not belong to this model."
            ) from None
        shape = (spec["out_features"], spec["in_features"])
        if tuple(weight.shape) != shape:
            raise ValueError(
                f"the Pixelfly plan for {name!r} is {shape[1]}->{shape[0]} but the model's matrix is "
                f"{weight.shape[1]}->{weight.shape[0]}; the config's pixelfly['modules'] does not fit this model."
            )
        structure = {key: spec[key] for key in ("butterfly_size", "n_factors", "rank", "block_size", "gate")}
        if project:
            layer = PixelflyLinear.from_dense(dense, n_iter=n_iter, input_covariance=(input_covariances or {}).get(name),
                                              cross_covariance=(cross_covariances or {}).get(name), **structure)
        else:
            layer = PixelflyLinear(
                shape[1], shape[0], bias=dense.bias is not None, device=weight.device, dtype=weight.dtype, **structure
            )
        setattr(root.get_submodule(parent_name) if parent_name else root, child, layer)
