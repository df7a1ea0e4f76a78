"""Hub round trip through a real HTTP server on 127.0.0.1: push in one process, pull in another, same outputs.

The clients run in subprocesses because huggingface_hub reads HF_ENDPOINT when it is imported.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from hub_server import LocalHub

PUSH = textwrap.dedent(
    """
    import sys, torch
    from safetensors.torch import save_file
    import pixelfly_hf
    from pixelfly_hf import PixelflyConfig, get_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    dense = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=97, n_positions=32,
                                       bos_token_id=0, eos_token_id=0)).eval()
    dense.config.name_or_path = "openai-community/gpt2"
    model = get_model(dense, PixelflyConfig(density=0.5, block_size=16, low_rank=8))
    inputs = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        logits = model(inputs).logits
    save_file({"inputs": inputs, "logits": logits}, sys.argv[1])
    model.push_to_hub("me/gpt2-pixelfly", tags=["tiny"])
    """
)

PULL = textwrap.dedent(
    """
    import sys, torch
    from safetensors.torch import load_file
    import pixelfly_hf
    from transformers import AutoModelForCausalLM

    expected = load_file(sys.argv[1])
    model = AutoModelForCausalLM.from_pretrained("me/gpt2-pixelfly")
    assert type(model).__name__ == "PixelflyGPT2LMHeadModel", type(model)
    with torch.no_grad():
        logits = model(expected["inputs"]).logits
    assert torch.equal(logits, expected["logits"]), (logits - expected["logits"]).abs().max()
    print("PULLED OK")
    """
)


def _run(script, hub, home, *args):
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_TOKEN="hf_dummy", HF_HOME=str(home), HF_HUB_OFFLINE="0",
               HF_HUB_DISABLE_TELEMETRY="1", TRANSFORMERS_OFFLINE="0")
    result = subprocess.run([sys.executable, "-c", script, *map(str, args)], env=env, capture_output=True, text=True,
                            timeout=180)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


@pytest.fixture()
def hub():
    with LocalHub() as server:
        yield server


def test_push_to_local_hub_and_load_back_with_the_auto_class(hub, tmp_path):
    outputs = tmp_path / "expected.safetensors"
    _run(PUSH, hub, tmp_path / "push_home", outputs)

    files = hub.repos["me/gpt2-pixelfly"]
    assert {"config.json", "model.safetensors", "README.md"} <= set(files)
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    config = json.loads(files["config.json"])
    assert config["model_type"] == "pixelfly_gpt2" and len(config["pixelfly"]["modules"]) == 8
    card = files["README.md"].decode()
    assert "base_model: openai-community/gpt2" in card and "pixelfly" in card
    assert '"density": 0.5' in card and 'AutoModelForCausalLM.from_pretrained("me/gpt2-pixelfly")' in card
    assert "- tiny" in card

    # a fresh process with an empty cache downloads everything from the server
    assert "PULLED OK" in _run(PULL, hub, tmp_path / "pull_home", outputs)
