"""get_model(..., calibration_data=...): each replaced matrix fitted to its outputs on the inputs the calibration
batches send it (calibration.py, PixelflyLinear.project_ with input_covariance), on a real transformers BERT."""
import copy

import pytest
import torch
from transformers import BertConfig, BertModel

from pixelfly_hf import PixelflyConfig, PixelflyLinear, get_model

CONFIG = PixelflyConfig(density=0.5, block_size=16, low_rank=8)


def bert():
    torch.manual_seed(0)
    config = BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=256,
                        vocab_size=97, max_position_embeddings=64, hidden_dropout_prob=0.1,
                        attention_probs_dropout_prob=0.1)
    return BertModel(config)


def batches(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, 97, (4, 24), generator=gen)} for _ in range(n)]


def recorded_inputs(model, names, data):
    """Every input row each named matrix receives while the dense model runs on data (eval mode), in float64."""
    seen = {name: [] for name in names}
    hooks = [model.get_submodule(name).register_forward_pre_hook(
        lambda module, args, name=name: seen[name].append(args[0].reshape(-1, args[0].shape[-1]).double()))
        for name in names]
    model.eval()
    with torch.no_grad():
        for batch in data:
            model(**batch)
    for hook in hooks:
        hook.remove()
    return {name: torch.cat(rows) for name, rows in seen.items()}


def test_calibrated_matrices_fit_their_outputs_on_the_calibration_inputs():
    dense = bert()
    calibration = batches(3, seed=1)
    model = get_model(copy.deepcopy(dense), CONFIG, calibration_data=calibration)
    by_weights = get_model(copy.deepcopy(dense), CONFIG)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, PixelflyLinear)}
    assert len(layers) == 12 and model.training  # the calibration ran in eval mode, and left the mode as it was
    inputs = recorded_inputs(dense, list(layers), calibration)
    for name, layer in layers.items():
        x, weight = inputs[name], dense.get_submodule(name).weight.double()

        def output_error(fitted):
            return ((x @ (weight - fitted.to_dense().double()).T).norm() / (x @ weight.T).norm()).item()

        # the reported error is the output error on exactly those inputs, and it beats the weight fit there
        assert layer.projection_error == pytest.approx(output_error(layer), rel=1e-3), name
        assert output_error(layer) < output_error(by_weights.get_submodule(name)), name


def test_calibration_needs_projection_and_batches_that_reach_the_matrices():
    with pytest.raises(ValueError, match="config.init='random'"):
        get_model(bert(), PixelflyConfig(density=0.5, block_size=16, init="random"), calibration_data=batches(1, 0))
    with pytest.raises(ValueError, match="never reached"):
        get_model(bert(), CONFIG, calibration_data=[])
