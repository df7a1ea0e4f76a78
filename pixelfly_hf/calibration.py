"""Input statistics of the matrices get_model replaces, from a few batches run through the dense model.

`PixelflyLinear.project_` with `input_covariance` fits a matrix to reproduce its outputs on the inputs it sees,
instead of fitting its weights: a pretrained model projected that way keeps more of what it computes (the weight
fit spends the parameters evenly on directions the activations seldom take).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .layers.linear import dense_weight_of


@torch.no_grad()
def input_covariances(model: nn.Module, root: nn.Module, names: Iterable[str], batches: Iterable) -> dict[str, torch.Tensor]:
    """{name: E[x x^T]} over every token that reaches each named nn.Linear / Conv1D under `root` (names relative to
    it) while `model` runs on `batches` in eval mode: dicts of keyword inputs, or tensors given as the first
    argument. Accumulated in float32 on each matrix's device."""
    sums, counts, hooks = {}, {}, []

    def record(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    for name in names:
        module = root.get_submodule(name)
        dense_weight_of(module)  # a TypeError naming the class if it is no nn.Linear / Conv1D
        hooks.append(module.register_forward_pre_hook(record(name)))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            if isinstance(batch, Mapping):
                model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
            else:
                model(batch.to(device))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    missing = sorted(set(names) - set(sums))
    if missing:
        raise ValueError(f"the calibration batches never reached {missing[:3]}{' ...' if len(missing) > 3 else ''}; "
                         "pass at least one batch of the model's own inputs")
    return {name: sums[name] / counts[name] for name in sums}
