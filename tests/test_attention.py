"""Pixelfly attention: pattern, joint normalisation, HF wiring (GPT-2 / BERT / ViT), KV cache, errors."""
import logging

import pytest
import torch
import transformers

from pixelfly_hf import PixelflyAttentionConfig
from pixelfly_hf.layers.attention import choose_attention, pattern_of, pixelfly_attention_forward
from pixelfly_kernels.butterfly_attention import PatternSpec, flex_pixelfly_attention, get_block_mask

SMALL = dict(block_size=16, n_factors=1, n_global_tokens=4, min_seq_len_for_sparse=0, max_density_for_sparse=1.0)


class FakeModule(torch.nn.Module):
    def __init__(self, is_causal, **options):
        super().__init__()
        self.is_causal = is_causal
        self.config = transformers.PretrainedConfig(pixelfly_attention={**SMALL, **options})


def allowed_by_definition(s, block, n_factors, n_global, causal, period=None):
    """The pattern written out position by position (independent of the bit tricks in the package)."""
    strides = {0} | {2**t for t in range(n_factors)}
    keep = torch.zeros(s, s, dtype=torch.bool)
    for q in range(s):
        for k in range(s):
            qb, kb = q // block, k // block
            x = qb ^ kb
            if period is not None:
                x %= period
            ok = x in strides or abs(qb - kb) <= 1 or k < n_global or (not causal and q < n_global)
            keep[q, k] = ok and (k <= q or not causal)
    return keep


def softmax_float64(q, k, v, keep, scale):
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    scores = scores.masked_fill(~keep, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return weights @ v.double()


def qkv(b=2, h=2, s=72, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, s, d, generator=gen) for _ in range(3)]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("period", [None, 4])
def test_reference_matches_float64_definition(causal, period):
    q, k, v = qkv(s=72)  # 72 = 4.5 blocks of 16: the ragged tail is part of the test
    module = FakeModule(causal, n_factors=2, butterfly_size=period)
    out, weights = pixelfly_attention_forward(module, q, k, v, None)
    assert weights is None and out.shape == (2, 72, 2, 16)
    keep = allowed_by_definition(72, 16, 2, 4, causal, period)
    assert not keep.all()  # the pattern is really sparse at this size
    expected = softmax_float64(q, k, v, keep, 16**-0.5).transpose(1, 2)
    torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # eager on CPU on purpose
@pytest.mark.parametrize("n_global", [4, 16], ids=["partial-global-block", "whole-global-block"])
@pytest.mark.parametrize("causal", [True, False])
def test_flex_path_matches_reference_on_cpu(causal, n_global):
    """The FlexAttention code path (BlockMask + mask_mod + score_mod, eager on CPU, forward only)."""
    q, k, v = qkv(s=72)
    spec = PatternSpec(16, None, 2, n_global)
    keep = allowed_by_definition(72, 16, 2, n_global, causal)
    scale = 0.25
    out = flex_pixelfly_attention(q, k, v, spec, causal, scale)
    torch.testing.assert_close(out.double(), softmax_float64(q, k, v, keep, scale), atol=2e-5, rtol=1e-5)
    # key padding mask (as transformers' sdpa_mask builds it), then an arbitrary 4-D mask
    key_keep = torch.ones(2, 72, dtype=torch.bool)
    key_keep[0, 60:] = False
    key_keep[1, :5] = False
    base = torch.ones(72, 72, dtype=torch.bool)
    base = base.tril() if causal else base
    hf_mask = (base & key_keep[:, None, :])[:, None]
    out = flex_pixelfly_attention(q, k, v, spec, causal, scale, hf_mask)
    torch.testing.assert_close(out.double(), softmax_float64(q, k, v, keep & hf_mask, scale), atol=2e-5, rtol=1e-5)
    odd_mask = torch.rand(2, 1, 72, 72, generator=torch.Generator().manual_seed(1)) > 0.3
    out = flex_pixelfly_attention(q, k, v, spec, causal, scale, odd_mask)
    torch.testing.assert_close(out.double(), softmax_float64(q, k, v, keep & odd_mask, scale), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("seq_len", [128, 120], ids=["whole-blocks", "padded-tail"])
@pytest.mark.parametrize("n_global,period", [(0, None), (16, None), (16, 4), (8, None)])
@pytest.mark.parametrize("causal", [True, False])
def test_block_mask_elements_equal_the_pattern(causal, n_global, period, seq_len):
    """What FlexAttention's compiled kernels compute from the BlockMask -- full tiles whole, partial tiles through
    mask_mod, empty tiles skipped -- is the pattern, element by element, for every real query row."""
    spec = PatternSpec(16, period, 2, n_global)
    bm = get_block_mask(seq_len, spec, causal, torch.device("cpu"))
    padded = 128
    q_idx, kv_idx = torch.arange(padded)[:, None], torch.arange(padded)[None, :]
    qb, kb = q_idx // 16, kv_idx // 16
    full = torch.zeros(8, 8, dtype=torch.bool)
    partial = torch.zeros(8, 8, dtype=torch.bool)
    for row in range(8):
        full[row, bm.full_kv_indices[0, 0, row, :bm.full_kv_num_blocks[0, 0, row]]] = True
        partial[row, bm.kv_indices[0, 0, row, :bm.kv_num_blocks[0, 0, row]]] = True
    computed = full[qb, kb] | (partial[qb, kb] & bm.mask_mod(0, 0, q_idx, kv_idx))
    expected = allowed_by_definition(padded, 16, 2, n_global, causal, period) & (kv_idx < seq_len)
    assert torch.equal(computed[:seq_len], expected[:seq_len])


def test_block_mask_skips_blocks():
    bm = get_block_mask(16 * 16, PatternSpec(16, None, 2, 0), False, torch.device("cpu"))
    # per row: {i, i^1, i^2} plus neighbours i-1, i+1 (i^1 is one of them) -> 4 or 5 of 16 blocks
    assert bm.kv_num_blocks.sum() + bm.full_kv_num_blocks.sum() <= 5 * 16


def test_global_tokens_counted_once():
    """Keys that are both in the sparse pattern and global get one weight: compare the weights the
    implementation applies with the definition, and check the all-global limit equals dense."""
    q, k, v = qkv(b=1, h=1, s=64)
    # rows in blocks 0/1 see block 0 through the pattern AND through the global tokens
    module = FakeModule(False, n_global_tokens=20)
    out, _ = pixelfly_attention_forward(module, q, k, v, None)
    keep = allowed_by_definition(64, 16, 1, 20, False)
    torch.testing.assert_close(out.double(), softmax_float64(q, k, v, keep, 0.25).transpose(1, 2), atol=2e-5, rtol=1e-5)
    # all tokens global -> exactly dense attention
    module = FakeModule(False, n_global_tokens=64)
    out, _ = pixelfly_attention_forward(module, q, k, v, None)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2)
    torch.testing.assert_close(out, dense, atol=2e-5, rtol=1e-5)


def test_causal_no_leakage():
    q, k, v = qkv(b=1, h=2, s=80)
    module = FakeModule(True)
    base, _ = pixelfly_attention_forward(module, q, k, v, None)
    t = 50
    for tensor in (q, k, v):
        tensor[:, :, t] += 3.0
    changed, _ = pixelfly_attention_forward(module, q, k, v, None)
    torch.testing.assert_close(changed[:, :t], base[:, :t], atol=0, rtol=0)
    assert not torch.allclose(changed[:, t], base[:, t])


def tiny_gpt2(**options):
    config = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=97, n_positions=128, attn_pdrop=0.0,
        pixelfly_attention={**SMALL, **options},
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config).eval()


def test_gpt2_generate_kv_cache_equals_no_cache():
    model = tiny_gpt2()
    model.set_attn_implementation("pixelfly")
    prompt = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=40, do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        cached = model.generate(prompt, use_cache=True, **kwargs)
        uncached = model.generate(prompt, use_cache=False, **kwargs)
    assert cached.sequences.shape[1] == 70  # crosses 4 blocks of 16: the sparse pattern is in play
    assert torch.equal(cached.sequences, uncached.sequences)
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(uncached.scores), atol=1e-4, rtol=1e-4)
    # and the pattern really changes the model (not silently dense)
    with torch.no_grad():
        full = model(cached.sequences).logits
        model.set_attn_implementation("sdpa")
        dense = model(cached.sequences).logits
    assert (full[:, -1] - dense[:, -1]).abs().max() > 1e-3
    torch.testing.assert_close(full[:, :16], dense[:, :16], atol=1e-5, rtol=1e-5)  # first block: all allowed


def test_gpt2_causal_leakage_and_save_load(tmp_path):
    model = tiny_gpt2()
    model.set_attn_implementation("pixelfly")
    ids = torch.randint(0, 97, (1, 70), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits
        ids2 = ids.clone()
        ids2[0, 45] = (ids2[0, 45] + 1) % 97
        torch.testing.assert_close(model(ids2).logits[:, :45], logits[:, :45], atol=0, rtol=0)
    model.save_pretrained(tmp_path)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, attn_implementation="pixelfly").eval()
    assert PixelflyAttentionConfig.from_dict(loaded.config.pixelfly_attention) == PixelflyAttentionConfig.from_dict(
        model.config.pixelfly_attention
    )
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, logits, atol=1e-6, rtol=1e-6)


def test_bert_padding_invariance():
    config = transformers.BertConfig(
        vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        attention_probs_dropout_prob=0.0, max_position_embeddings=128, pixelfly_attention=dict(SMALL),
    )
    torch.manual_seed(0)
    model = transformers.BertModel(config, add_pooling_layer=False).eval()
    model.set_attn_implementation("pixelfly")
    lengths = (70, 41)
    gen = torch.Generator().manual_seed(2)
    seqs = [torch.randint(1, 97, (n,), generator=gen) for n in lengths]
    ids = torch.zeros(2, 70, dtype=torch.long)
    mask = torch.zeros(2, 70, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).last_hidden_state
        for i, s in enumerate(seqs):
            alone = model(s[None]).last_hidden_state
            torch.testing.assert_close(batched[i, : len(s)], alone[0], atol=1e-5, rtol=1e-5)


def test_vit_all_global_equals_sdpa_and_sparse_differs():
    config = transformers.ViTConfig(
        image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, attention_probs_dropout_prob=0.0, pixelfly_attention={**SMALL, "n_global_tokens": 65},
    )  # 64 patches + CLS = 65 tokens (ragged: not a multiple of 16)
    torch.manual_seed(0)
    model = transformers.ViTModel(config, add_pooling_layer=False).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        dense = model(pixels).last_hidden_state
        model.set_attn_implementation("pixelfly")
        all_global = model(pixels).last_hidden_state
        model.config.pixelfly_attention = dict(SMALL)  # CLS (position 0) stays global
        sparse = model(pixels).last_hidden_state
    torch.testing.assert_close(all_global, dense, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(sparse).all() and (sparse - dense).abs().max() > 1e-3


def test_short_sequences_use_dense_sdpa_and_say_so(caplog):
    q, k, v = qkv(b=1, h=2, s=48)
    module = FakeModule(True, min_seq_len_for_sparse=64)
    with caplog.at_level(logging.INFO, logger="pixelfly_hf.layers.attention"):
        out, _ = pixelfly_attention_forward(module, q, k, v, None)
    assert "seq_len=48" in caplog.text and "sdpa" in caplog.text
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    torch.testing.assert_close(out, dense, atol=1e-6, rtol=1e-6)
    defaults = PixelflyAttentionConfig()
    assert choose_attention(1024, defaults) == "sdpa" and choose_attention(4096, defaults) == "pixelfly"


def test_settings_roundtrip_and_errors():
    s = PixelflyAttentionConfig(block_size=64, butterfly_size=8, n_factors=3, n_global_tokens=16)
    assert PixelflyAttentionConfig.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError, match="block_size=48"):
        PixelflyAttentionConfig(block_size=48)
    with pytest.raises(ValueError, match="n_factors=4.*log2"):
        PixelflyAttentionConfig(butterfly_size=8, n_factors=4)
    with pytest.raises(ValueError, match="unknown pixelfly_attention option.*blok_size"):
        PixelflyAttentionConfig.from_dict({"blok_size": 16})
    with pytest.warns(FutureWarning, match="option low_rank is deprecated: it is n_global_tokens"):
        renamed = PixelflyAttentionConfig.from_dict({"low_rank": 16})
    assert renamed == PixelflyAttentionConfig(n_global_tokens=16)
    with pytest.raises(ValueError, match="both low_rank=16 and n_global_tokens=8.*drop it"):
        PixelflyAttentionConfig.from_dict({"low_rank": 16, "n_global_tokens": 8})
    with pytest.raises(ValueError, match="n_global_tokens=-1"):
        PixelflyAttentionConfig(n_global_tokens=-1)
    with pytest.raises(ValueError, match=r"max_density_for_sparse=0 must be a number in \(0, 1\]"):
        PixelflyAttentionConfig(max_density_for_sparse=0)


def test_bad_inputs_name_the_value_and_fix():
    module = FakeModule(False)
    q, k, v = qkv(b=1, h=2, s=32, d=24)
    with pytest.raises(ValueError, match="head_dim=24.*attn_implementation='sdpa'"):
        pixelfly_attention_forward(module, q, k, v, None)
    q, k, v = qkv(b=1, h=2, s=32)
    with pytest.raises(ValueError, match="float64.*bfloat16"):
        pixelfly_attention_forward(module, q.double(), k.double(), v.double(), None)
    with pytest.raises(ValueError, match=r"\(1, 1, 32, 31\).*kv_len=32"):
        pixelfly_attention_forward(module, q, k, v, torch.ones(1, 1, 32, 31, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"shape \(1, 32\)"):
        pixelfly_attention_forward(module, q, k, v, torch.ones(1, 32, dtype=torch.bool))


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
def test_flex_gpu_bf16_matches_reference(causal):
    from pixelfly_hf.layers.attention import reference_pixelfly_attention

    settings = PixelflyAttentionConfig(
        block_size=128, n_factors=2, n_global_tokens=32, min_seq_len_for_sparse=0, max_density_for_sparse=1.0
    )
    module = FakeModule(causal, **settings.to_dict())
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, 1000, 64, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(3))
    for t in (q, k, v):
        t.requires_grad_(True)
    out, _ = pixelfly_attention_forward(module, q, k, v, None)
    grad = torch.randn_like(out)
    out.backward(grad)
    fast_grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    ref = reference_pixelfly_attention(q.float(), k.float(), v.float(), None, pattern_of(settings), causal, 64**-0.5)
    ref.transpose(1, 2).backward(grad.float())
    torch.testing.assert_close(out.float(), ref.transpose(1, 2), atol=2e-2, rtol=2e-2)
    for fast, t in zip(fast_grads, (q, k, v)):
        torch.testing.assert_close(fast.float(), t.grad.float(), atol=5e-2, rtol=5e-2)
