"""LoRA from PEFT on a Pixelfly model: it adapts the matrices left dense, saves and loads as a PEFT adapter, and its
merge_and_unload gives back the Pixelfly model. PixelflyLinear itself is no LoRA target (peft has no layer for it)."""
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2LMHeadModel

from pixelfly_hf import PixelflyConfig, PixelflyLinear, get_model
from test_models import SMALL, VOCAB, gpt2_config, pixelfly_layers

peft = pytest.importorskip("peft")


def pixelfly_mlp_gpt2():
    return get_model(GPT2LMHeadModel(gpt2_config()).eval(), PixelflyConfig(**SMALL, target_modules=["mlp"]))


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft calls it
def test_lora_on_the_dense_attention_of_a_pixelfly_gpt2_trains_saves_loads_and_merges(tmp_path):
    torch.manual_seed(0)
    model = pixelfly_mlp_gpt2()
    model.save_pretrained(tmp_path / "base")
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0,
                                                      fan_in_fan_out=True))
    trainable = {name for name, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert all(not p.requires_grad for layer in pixelfly_layers(lora).values() for p in layer.parameters())

    batch = torch.randint(1, VOCAB, (4, 16))
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = lora(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    lora.eval()
    with torch.no_grad():
        adapted = lora(batch).logits

    lora.save_pretrained(tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(loaded(batch).logits, adapted)

    merged = loaded.merge_and_unload()
    assert type(merged) is type(model) and len(pixelfly_layers(merged)) == 4
    with torch.no_grad():
        torch.testing.assert_close(merged(batch).logits, adapted, rtol=0, atol=1e-5)


def test_lora_cannot_target_a_pixelfly_linear():
    model = pixelfly_mlp_gpt2()
    assert isinstance(model.transformer.h[0].mlp.c_fc, PixelflyLinear)
    with pytest.raises(ValueError, match=r"Target module PixelflyLinear\(.*\) is not supported"):
        peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["c_fc"]))
