"""get_model(..., calibration_data=...): each replaced matrix fitted, in forward order, to the dense outputs on the
inputs the calibration batches send it once the matrices before it are Pixelfly (calibration.py, PixelflyLinear.
project_ with input_covariance and cross_covariance), on real transformers BERT and GPT-2 models."""
import copy

import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

from pixelfly_hf import PixelflyConfig, PixelflyLinear, get_model

CONFIG = PixelflyConfig(density=0.5, block_size=16, low_rank=8)


def bert():
    torch.manual_seed(0)
    config = BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=256,
                        vocab_size=97, max_position_embeddings=64, hidden_dropout_prob=0.1,
                        attention_probs_dropout_prob=0.1)
    return BertModel(config)


def gpt2():
    torch.manual_seed(0)
    return GPT2Model(GPT2Config(n_layer=3, n_embd=64, n_head=4, vocab_size=97, n_positions=64, bos_token_id=0,
                                eos_token_id=0))


def batches(n, seed):
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, 97, (4, 24), generator=gen)} for _ in range(n)]


def recorded_inputs(model, names, data):
    """Every input row each named matrix receives while the model runs on data (eval mode), in float64."""
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


def pixelfly_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, PixelflyLinear)}


def dense_weight(module):
    return module.weight.double() if isinstance(module, torch.nn.Linear) else module.weight.double().T


def test_each_matrix_fits_the_dense_outputs_on_the_inputs_the_projected_model_sends_it():
    dense = bert()
    calibration = batches(3, seed=1)
    config = PixelflyConfig(density=0.5, block_size=16, low_rank=8,
                            target_modules=["attn", "mlp", r"pooler\.dense"])  # the pooler sits outside the blocks
    model = get_model(copy.deepcopy(dense), config, calibration_data=calibration)
    by_weights = get_model(copy.deepcopy(dense), config)
    layers = pixelfly_layers(model)
    assert len(layers) == 13 and model.training  # the calibration ran in eval mode, and left the mode as it was
    # later fits leave earlier inputs alone: these are the inputs each matrix was fitted on
    inputs, dense_inputs = recorded_inputs(model, list(layers), calibration), recorded_inputs(dense, list(layers), calibration)
    for name, layer in layers.items():
        x, x_dense, weight = inputs[name], dense_inputs[name], dense_weight(dense.get_submodule(name))

        def output_error(fitted):
            return ((x @ fitted.to_dense().double().T - x_dense @ weight.T).norm() / (x_dense @ weight.T).norm()).item()

        assert output_error(layer) < output_error(by_weights.get_submodule(name)), name
        if name.startswith("encoder.layer.0.attention.self."):  # the first stage sees the dense inputs: the reported
            assert torch.equal(x, x_dense)  # error is the output error on exactly those inputs
            assert layer.projection_error == pytest.approx(output_error(layer), rel=1e-3), name


@pytest.mark.parametrize("build", [bert, gpt2])
def test_the_sequential_fit_beats_the_per_matrix_fit_on_held_out_inputs(build):
    """Against a float64 per-matrix reference (each matrix fitted to its outputs on the dense model's inputs), the
    fit in forward order makes up for earlier errors: the final hidden state lands closer to the dense model's."""
    dense = build()
    calibration, held_out = batches(4, seed=1), batches(4, seed=2)
    model = get_model(copy.deepcopy(dense), CONFIG, calibration_data=calibration)
    per_matrix = get_model(copy.deepcopy(dense), CONFIG)
    layers = pixelfly_layers(per_matrix)
    for name, x in recorded_inputs(dense, list(layers), calibration).items():
        layers[name].project_(dense_weight(dense.get_submodule(name)), input_covariance=x.T @ x / x.shape[0])

    def final_error(fitted):
        fitted, reference = fitted.double().eval(), copy.deepcopy(dense).double().eval()
        with torch.no_grad():
            num = sum((fitted(**b).last_hidden_state - reference(**b).last_hidden_state).norm() ** 2 for b in held_out)
            den = sum(reference(**b).last_hidden_state.norm() ** 2 for b in held_out)
        return (num / den).sqrt().item()

    assert final_error(model) < 0.9 * final_error(per_matrix)


def test_cross_covariance_fits_the_dense_outputs_from_other_inputs():
    torch.manual_seed(0)
    layer = PixelflyLinear(64, 64, butterfly_size=4, n_factors=1, rank=4, block_size=16)
    weight = torch.randn(64, 64, dtype=torch.float64)
    x_dense = torch.randn(2000, 64, dtype=torch.float64) @ torch.randn(64, 64, dtype=torch.float64)
    x = x_dense + 0.3 * x_dense.roll(1, dims=1)  # what earlier projected layers might send instead

    def output_error():
        return ((x @ layer.to_dense().double().T - x_dense @ weight.T).norm() / (x_dense @ weight.T).norm()).item()

    covariance, cross = x.T @ x / len(x), x_dense.T @ x / len(x)
    layer.project_(weight, input_covariance=covariance)
    own_inputs_only = output_error()
    layer.project_(weight, input_covariance=covariance, cross_covariance=cross)
    assert output_error() < 0.8 * own_inputs_only
    # with the dense inputs themselves, the cross term changes nothing
    layer.project_(weight, input_covariance=covariance)
    plain = layer.to_dense().clone()
    layer.project_(weight, input_covariance=covariance, cross_covariance=covariance)
    torch.testing.assert_close(layer.to_dense(), plain, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="cross_covariance has shape"):
        layer.project_(weight, input_covariance=covariance, cross_covariance=cross[:8])
    with pytest.raises(ValueError, match="pass both"):
        layer.project_(weight, cross_covariance=cross)


def test_calibration_needs_projection_and_batches_that_reach_the_matrices():
    with pytest.raises(ValueError, match="config.init='random'"):
        get_model(bert(), PixelflyConfig(density=0.5, block_size=16, init="random"), calibration_data=batches(1, 0))
    with pytest.raises(ValueError, match="never reached"):
        get_model(bert(), CONFIG, calibration_data=[])


def test_calibration_passes_run_the_new_layers_on_the_reference_path_then_hand_them_back(monkeypatch):
    """The calibration passes run the layers already fitted in float32; on a GPU their Triton path would tune
    kernels for a dtype training never uses, so they take the PyTorch path, and "auto" comes back after."""
    used = []
    resolve = PixelflyLinear._resolve_backend
    monkeypatch.setattr(PixelflyLinear, "_resolve_backend",
                        lambda self, x: used.append(self.backend) or resolve(self, x))
    model = get_model(gpt2(), CONFIG, calibration_data=batches(2, seed=1))
    assert used and set(used) == {"reference"}  # the fitted layers ran in later stages' passes
    layers = pixelfly_layers(model)
    assert len(layers) == 12 and all(layer.backend == "auto" for layer in layers.values())
