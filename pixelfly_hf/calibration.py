"""Projecting the matrices get_model replaces onto their outputs, from a few batches of the model's inputs.

`PixelflyLinear.project_` with `input_covariance` fits a matrix to reproduce its outputs on the inputs it sees,
instead of fitting its weights: a pretrained model projected that way keeps more of what it computes (the weight
fit spends the parameters evenly on directions the activations seldom take).

The matrices are fitted in forward order (GPTQ's sequential scheme): each one on the inputs x the model sends it once
the matrices before it are Pixelfly, against the outputs W x_d of the dense model on its own inputs, i.e. it
minimises E||(S + U V) x - W x_d||^2 (project_'s cross_covariance), so it makes up for part of the error the earlier
fits left. Matrices that read one tensor (query, key, value) form one stage. The transformer blocks (the ModuleList
holding the matrices) run one at a time on their cached inputs, so a stage costs two partial passes of one block
over the batches; matrices outside the blocks are fitted last with passes of the whole model.
"""
from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from .layers.linear import dense_weight_of
from .models.install import install_pixelfly_layers


class _Reached(Exception):
    """Stops a forward pass once the input it was run for has been seen."""


@torch.no_grad()
def project_calibrated(model: nn.Module, root: nn.Module, plan: dict[str, dict], batches: Iterable,
                       n_iter: int = 3) -> None:
    """Replace each planned nn.Linear / Conv1D under `root` (plan names relative to it) with a PixelflyLinear
    fitted, in forward order, to the dense outputs while `model` runs on `batches` in eval mode: dicts of keyword
    inputs, or tensors given as the first argument. Holds a dense copy of `model` while it works; statistics are
    accumulated in float32 on the model's device."""
    for name in plan:
        dense_weight_of(root.get_submodule(name))  # a TypeError naming the class if it is no nn.Linear / Conv1D
    device = next(model.parameters()).device
    inputs = [((), {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
              if isinstance(batch, Mapping) else ((batch.to(device),), {}) for batch in batches]
    if not inputs:
        _never_reached(list(plan))
    dense_model = copy.deepcopy(model)  # the reference outputs: `model` turns Pixelfly stage by stage
    root_path = next(path for path, module in model.named_modules() if module is root)
    dense_root = dense_model.get_submodule(root_path)
    was_training, use_cache = model.training, getattr(model.config, "use_cache", None)
    calibrating = []  # the layers installed so far, on the reference path until the end
    model.eval()
    dense_model.eval()
    if use_cache:  # a cache passed to the blocks would grow each time a block is rerun
        model.config.use_cache = dense_model.config.use_cache = False
    try:
        blocks_path, by_block = _blocks(root, plan)
        if by_block:
            first, last = min(by_block), max(by_block)
            sparse_inputs = dense_inputs = _block_inputs(model, root.get_submodule(f"{blocks_path}.{first}"), inputs)
            if not sparse_inputs:
                _never_reached(by_block[first])
            for index in range(first, last + 1):
                path = f"{blocks_path}.{index}"
                block, dense_block = root.get_submodule(path), dense_root.get_submodule(path)
                _fit_stages(block, dense_block, {name[len(path) + 1:]: plan[name] for name in by_block.get(index, [])},
                            calibrating, sparse_inputs, dense_inputs, n_iter)
                if index < last:
                    sparse_inputs = [_next_input(block, x) for x in sparse_inputs]
                    dense_inputs = [_next_input(dense_block, x) for x in dense_inputs]
        outside = [name for name in plan if not any(name in names for names in by_block.values())]
        prefix = f"{root_path}." if root_path else ""
        _fit_stages(model, dense_model, {prefix + name: plan[name] for name in outside}, calibrating, inputs, inputs,
                    n_iter)
    finally:
        for layer in calibrating:
            layer.backend = "auto"
        model.train(was_training)
        if use_cache:
            model.config.use_cache = use_cache


def _never_reached(names: list[str]):
    raise ValueError(f"the calibration batches never reached {names[:3]}{' ...' if len(names) > 3 else ''}; "
                     "pass at least one batch of the model's own inputs")


def _blocks(root: nn.Module, names: Iterable[str]) -> tuple[str, dict[int, list[str]]]:
    """(path of the ModuleList of blocks, {block index: the names inside that block}); the ModuleList is the outermost
    one holding the first name, and names outside it are left out."""
    blocks_path, by_block = None, {}
    for name in names:
        parts = name.split(".")
        for i in range(1, len(parts)):
            parent = ".".join(parts[:i - 1])
            if isinstance(root.get_submodule(parent), nn.ModuleList) and parts[i - 1].isdigit():
                if blocks_path is None:
                    blocks_path = parent
                if parent == blocks_path:
                    by_block.setdefault(int(parts[i - 1]), []).append(name)
                break
    return blocks_path, by_block


def _run(segment: nn.Module, inputs: tuple):
    args, kwargs = inputs
    try:
        return segment(*args, **kwargs)
    except _Reached:
        return None


def _block_inputs(model: nn.Module, block: nn.Module, inputs: list) -> list:
    """The (args, kwargs) `block` receives on each of `inputs` to `model`; the pass stops there."""
    seen = []

    def hook(module, args, kwargs):
        seen.append((args, kwargs))
        raise _Reached

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for x in inputs:
            _run(model, x)
    finally:
        handle.remove()
    return seen


def _next_input(block: nn.Module, inputs: tuple) -> tuple:
    """The next block's (args, kwargs): this block's output in place of its hidden states, the rest as they were."""
    args, kwargs = inputs
    out = block(*args, **kwargs)
    return (out[0] if isinstance(out, tuple) else out, *args[1:]), kwargs


def _input_of(segment: nn.Module, name: str, inputs: tuple) -> torch.Tensor:
    """The input rows (tokens x features, float32) that matrix `name` reads when `segment` runs on `inputs`."""
    seen = []

    def hook(module, args):
        seen.append(args[0].detach().reshape(-1, args[0].shape[-1]).float())
        raise _Reached

    handle = segment.get_submodule(name).register_forward_pre_hook(hook)
    try:
        _run(segment, inputs)
    finally:
        handle.remove()
    return seen[0]


def _stages(segment: nn.Module, names: list[str], inputs: tuple) -> list[list[str]]:
    """`names` grouped by the tensor they read on `inputs`, groups in the order the forward pass first reads them."""
    read = {}
    handles = [segment.get_submodule(name).register_forward_pre_hook(
        lambda module, args, name=name: read.setdefault(name, args[0])) for name in names]
    try:
        _run(segment, inputs)
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in names if name not in read]
    if missing:
        _never_reached(missing)
    stages = []
    for name, tensor in read.items():
        stage = next((stage for stage in stages if read[stage[0]] is tensor), None)
        if stage is None:
            stages.append([name])
        else:
            stage.append(name)
    return stages


def _fit_stages(segment: nn.Module, dense_segment: nn.Module, plan: dict[str, dict], calibrating: list,
                sparse_inputs: list, dense_inputs: list, n_iter: int):
    """Project `plan`'s matrices (names relative to `segment`) stage by stage, appending the new layers to
    `calibrating`; each stage's statistics come from `segment` as the stages before left it, paired token by token
    with the dense segment's inputs."""
    if not plan:
        return
    for stage in _stages(dense_segment, list(plan), dense_inputs[0]):
        covariance = cross = 0
        rows = 0
        for sparse_x, dense_x in zip(sparse_inputs, dense_inputs):
            x, x_dense = _input_of(segment, stage[0], sparse_x), _input_of(dense_segment, stage[0], dense_x)
            covariance = covariance + x.T @ x
            cross = cross + x_dense.T @ x
            rows += x.shape[0]
        install_pixelfly_layers(segment, {name: plan[name] for name in stage}, project=True, n_iter=n_iter,
                                input_covariances=dict.fromkeys(stage, covariance / rows),
                                cross_covariances=dict.fromkeys(stage, cross / rows))
        for name in stage:
            # the later stages' passes run the new layer in float32: on a GPU the Triton path would tune kernels
            # for that dtype, which training never uses; project_calibrated sets "auto" back at the end
            layer = segment.get_submodule(name)
            layer.backend = "reference"
            calibrating.append(layer)
