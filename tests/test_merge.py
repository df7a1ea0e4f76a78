"""merge_and_unload on tiny GPT-2 / BERT / ViT: the stock model it returns computes what the Pixelfly model did,
and its checkpoint loads in a fresh process that never imports pixelfly_hf."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from transformers import BertForMaskedLM, GPT2LMHeadModel, ViTForImageClassification
from transformers.pytorch_utils import Conv1D

from pixelfly_hf import PixelflyConfig, get_model
from pixelfly_hf.merge import merged_weight
from test_models import (
    SMALL, bert_config, first_output, gpt2_config, image_inputs, pixelfly_layers, text_inputs, vit_config
)

CASES = {
    "GPT2LMHeadModel": (GPT2LMHeadModel, gpt2_config, text_inputs, "AutoModelForCausalLM"),
    "BertForMaskedLM": (BertForMaskedLM, bert_config, text_inputs, "AutoModelForMaskedLM"),
    "ViTForImageClassification": (ViTForImageClassification, lambda: vit_config(qkv_bias=False), image_inputs,
                                  "AutoModelForImageClassification"),  # bias-free q, k, v
}

LOAD_WITHOUT_PIXELFLY = textwrap.dedent(
    """
    import sys, torch, transformers
    from safetensors.torch import load_file

    for folder, auto_name in zip(sys.argv[1::2], sys.argv[2::2]):
        expected = load_file(folder + "/expected.safetensors")
        model = getattr(transformers, auto_name).from_pretrained(folder).eval()
        assert not type(model).__name__.startswith("Pixelfly"), type(model)
        inputs = {key: value for key, value in expected.items() if key != "output"}
        with torch.no_grad():
            output = model(**inputs)
        output = output.logits if hasattr(output, "logits") else output.last_hidden_state
        assert torch.equal(output, expected["output"]), (folder, (output - expected["output"]).abs().max())
        print("LOADED", type(model).__name__)
    assert not any(name.split(".")[0] in ("pixelfly_hf", "pixelfly_kernels") for name in sys.modules)
    """
)


@torch.no_grad()
def trained_looking(model):
    """Move every Pixelfly parameter off its init (U starts at zero) so the merge is checked on every term."""
    for layer in pixelfly_layers(model).values():
        for param in layer.parameters():
            param.add_(torch.randn_like(param), alpha=0.05)
    return model


def test_merged_models_match_the_pixelfly_models_and_load_without_pixelfly_hf(tmp_path):
    torch.manual_seed(0)
    args = []
    for case, (dense_class, make_config, make_inputs, auto_name) in CASES.items():
        model = trained_looking(get_model(dense_class(make_config()).eval(), PixelflyConfig(**SMALL)))
        assert case != "ViTForImageClassification" or model.vit.layers[0].attention.q_proj.bias is None
        inputs = make_inputs()
        with torch.no_grad():
            expected = first_output(model(**inputs))
        merged = model.merge_and_unload()

        assert type(merged) is dense_class and type(merged.config) is dense_class.config_class
        assert merged.config.model_type == make_config().model_type
        assert not pixelfly_layers(merged) and not hasattr(merged.config, "pixelfly")
        assert merged.config._attn_implementation == "sdpa"
        with torch.no_grad():
            output = first_output(merged(**inputs))
        assert (output - expected).abs().max() <= 1e-4, (case, (output - expected).abs().max())

        folder = tmp_path / case
        merged.save_pretrained(folder)
        saved = json.loads((folder / "config.json").read_text())
        assert saved["model_type"] == make_config().model_type and "pixelfly" not in saved and "auto_map" not in saved
        assert not any(name.endswith(".py") for name in os.listdir(folder))
        save_file({**inputs, "output": output}, folder / "expected.safetensors")
        args += [str(folder), auto_name]

    result = subprocess.run([sys.executable, "-c", LOAD_WITHOUT_PIXELFLY, *args], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("LOADED") == len(CASES)


def test_gpt2_layers_become_conv1d_with_the_merged_weight_and_bias():
    torch.manual_seed(0)
    model = trained_looking(get_model(GPT2LMHeadModel(gpt2_config()), PixelflyConfig(**SMALL)))
    layer = model.transformer.h[1].mlp.c_fc
    x = torch.randn(5, layer.in_features, dtype=torch.float64)
    with torch.no_grad():
        reference = layer.double()(x)  # the layer's own forward, in float64
        layer.float()
    conv = model.merge_and_unload().transformer.h[1].mlp.c_fc
    assert type(conv) is Conv1D and tuple(conv.weight.shape) == (layer.in_features, layer.out_features)
    with torch.no_grad():
        torch.testing.assert_close(conv.double()(x), reference, rtol=0, atol=1e-5)


def test_an_untrained_gate_folds_exactly_and_a_trained_gate_is_refused():
    torch.manual_seed(0)
    model = get_model(GPT2LMHeadModel(gpt2_config()).eval(), PixelflyConfig(**SMALL, gate=True))
    trained_looking(model)
    gated = model.transformer.h[0].attn.c_proj
    with torch.no_grad():
        for layer in pixelfly_layers(model).values():
            layer.gate.weight.zero_()  # g = sigmoid(bias) for every token: one matrix
    x = torch.randn(4, gated.in_features)
    with torch.no_grad():
        torch.testing.assert_close(x @ merged_weight(gated).T + gated.bias, gated(x), rtol=0, atol=1e-5)

    with torch.no_grad():
        gated.gate.weight.normal_()
    refusal = r"cannot merge transformer\.h\.0\.attn\.c_proj: its gate depends on the input .* gate=False"
    with pytest.raises(ValueError, match=refusal):
        model.merge_and_unload()


def test_pixelfly_attention_goes_back_to_sdpa_and_keeps_the_weights():
    torch.manual_seed(0)
    options = {"block_size": 16, "n_factors": 1, "n_global_tokens": 2, "min_seq_len_for_sparse": 0}
    config = PixelflyConfig(**SMALL, attention="pixelfly", attention_config=options)
    model = trained_looking(get_model(GPT2LMHeadModel(gpt2_config(n_positions=256)).eval(), config))
    inputs = torch.randint(1, 97, (2, 256))
    with torch.no_grad():
        sparse = model(inputs).logits
        weights = {name: merged_weight(layer).T.clone() for name, layer in pixelfly_layers(model).items()}
    merged = model.merge_and_unload()

    assert merged.config._attn_implementation == "sdpa" and not hasattr(merged.config, "pixelfly_attention")
    for name, weight in weights.items():
        assert torch.equal(merged.get_submodule(name).weight, weight)
    stock = GPT2LMHeadModel(gpt2_config(n_positions=256)).eval()
    stock.load_state_dict(merged.state_dict())
    with torch.no_grad():
        dense = merged(inputs).logits
        assert torch.equal(dense, stock(inputs).logits)
    assert (dense - sparse).abs().max() > 1e-3  # documented: the attention pattern is not a matrix to merge
