"""merge_and_unload: turn a Pixelfly model back into the stock transformers model it came from, in place.

Every PixelflyLinear becomes the dense layer of the original kind (nn.Linear, or GPT-2's Conv1D whose weight is
in x out) holding S + U V, so the merged model computes what the Pixelfly model computed and loads without
pixelfly_hf. Pixelfly attention has no dense equivalent: the merged model goes back to the model's default
attention (its outputs then differ), the weights are kept.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from pixelfly_kernels.reference import butterfly_to_dense

from .layers.attention import ATTENTION_NAME
from .layers import PixelflyLinear
from .models.registry import dense_class_of


@torch.no_grad()
def merged_weight(layer: PixelflyLinear, name: str = "layer") -> torch.Tensor:
    """The (out x in) matrix the layer applies, computed in float64 and returned in the layer's dtype.

    A gate mixes the two terms per token, g = sigmoid(w . x + c), so the layer is one matrix only while w = 0:
    then g = sigmoid(c) for every token and W = (1 - g) S + g U V exactly. A trained gate (w != 0) is refused.
    """
    sparse = butterfly_to_dense(layer.weight.double())
    low = layer.lowrank_u.double() @ layer.lowrank_v.double() if layer.rank else torch.zeros_like(sparse)
    if layer.gate is None:
        return (sparse + low).to(layer.weight.dtype)
    if torch.count_nonzero(layer.gate.weight):
        raise ValueError(
            f"cannot merge {name}: its gate depends on the input (gate.weight is nonzero), so the layer mixes its "
            "sparse and low-rank terms per token and is no single dense matrix. Build the model with gate=False "
            "(PixelflyConfig(gate=False), or overrides={name: {'gate': False}}) to be able to merge it, or keep "
            "the Pixelfly model."
        )
    g = torch.sigmoid(layer.gate.bias.double())
    return ((1 - g) * sparse + g * low).to(layer.weight.dtype)


def _dense_layer(layer: PixelflyLinear, kind: type, name: str) -> nn.Module:
    """An nn.Linear, or a Conv1D (weight stored in x out), applying the layer's matrix."""
    weight = merged_weight(layer, name)
    bias = layer.bias.detach().clone() if layer.bias is not None else None
    with torch.device("meta"):  # shapes only: the merged tensors replace the init
        dense = Conv1D(layer.out_features, layer.in_features) if kind is Conv1D else nn.Linear(
            layer.in_features, layer.out_features, bias=bias is not None
        )
    dense.weight = nn.Parameter(weight.t().contiguous() if kind is Conv1D else weight)
    if bias is not None:
        dense.bias = nn.Parameter(bias)
    return dense


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Replace every PixelflyLinear of a Pixelfly model by its dense equivalent; return the stock model.

    The model becomes its transformers class (e.g. GPT2LMHeadModel) with that class's config (model_type
    restored, the pixelfly fields dropped), so save_pretrained writes a checkpoint any transformers install loads.
    """
    dense_class = dense_class_of(type(model))
    config = model.config
    values = config.to_dict()
    for key in ("model_type", "transformers_version", "auto_map", "pixelfly", "pixelfly_attention"):
        values.pop(key, None)
    attention = None if config._attn_implementation == ATTENTION_NAME else config._attn_implementation
    dense_config = dense_class.config_class(**values, attn_implementation=attention)
    dense_config.name_or_path = config.name_or_path
    # a weightless instance of the dense class tells which kind of layer sits at each name; building it also
    # resolves attn_implementation=None to the model's default (sdpa where available), as from_pretrained does
    with torch.device("meta"):
        skeleton = dense_class(dense_config)
    # every layer is merged before any is swapped, so a refused layer leaves the model as it was
    dense_layers = {
        name: _dense_layer(layer, type(skeleton.get_submodule(name)), name)
        for name, layer in model.named_modules()
        if isinstance(layer, PixelflyLinear)
    }
    for name, dense in dense_layers.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, dense)

    for module in model.modules():
        if getattr(module, "config", None) is config:
            module.config = dense_config
    model.__class__ = dense_class
    return model
