import math
import warnings

import pytest
import torch

from pixelfly_hf.patterns import FlatButterflyLayout, MatrixPlan, _candidate_layouts, plan_matrix, validate_rank
from pixelfly_kernels.butterfly_pattern import kept, partners, slot_offsets


@pytest.mark.parametrize("bs,k", [(2, 1), (4, 0), (8, 2), (16, 2), (16, 4), (32, 3)])
def test_tile_mask_is_the_xor_pattern(bs, k):
    layout = FlatButterflyLayout(bs * 16, bs * 32, bs, k, block_size=16)
    mask = layout.tile_mask()
    allowed = {0} | {1 << i for i in range(k)}
    expected = torch.tensor([[(r ^ c) in allowed for c in range(bs)] for r in range(bs)])
    assert torch.equal(mask, expected)
    assert torch.equal(mask, mask.T)  # symmetric: the transpose reads the same offsets
    assert (mask.sum(0) == k + 1).all() and (mask.sum(1) == k + 1).all()
    assert layout.density == pytest.approx((k + 1) / bs)
    elem = layout.element_mask()
    assert elem.shape == (bs * 16, bs * 32)
    assert elem.float().mean().item() == pytest.approx(layout.density)
    assert layout.num_params == int(elem.sum())


def test_offsets_and_input_tiles():
    assert slot_offsets(0) == [0]
    assert slot_offsets(3) == [0, 1, 2, 4]
    layout = FlatButterflyLayout(128, 256, 8, 2, block_size=16)
    assert layout.tile_shape == (16, 32) and layout.n_slots == 3
    assert layout.input_tiles()[5].tolist() == [5, 4, 7]


@pytest.mark.parametrize("size, n_factors", [(8, 0), (8, 2), (16, 3), (32, 5)])
def test_the_pattern_owner_agrees_with_the_rule_written_out(size, n_factors):
    """partners() (the linear layers' gather) and kept() (attention's mask) against the rule spelled out per cell:
    (i, j) kept iff i XOR j is 0 or a power of two below 2**n_factors."""
    rule = torch.tensor([[(i ^ j) in {0, *(2**t for t in range(n_factors))} for j in range(size)] for i in range(size)])
    xor = torch.arange(size)[:, None] ^ torch.arange(size)[None, :]
    assert torch.equal(kept(xor, n_factors), rule)
    gathered = torch.zeros(size, size, dtype=torch.bool)
    gathered.scatter_(1, partners(size, n_factors), True)
    assert torch.equal(gathered, rule) and rule.sum(1).eq(n_factors + 1).all()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(out_features=96, in_features=96, butterfly_size=3, n_factors=1), "butterfly_size=3 must be a power of 2"),
        (dict(out_features=96, in_features=96, butterfly_size=1, n_factors=0), "butterfly_size=1"),
        (dict(out_features=128, in_features=128, butterfly_size=8, n_factors=4), r"n_factors=4 .* \[0, 3\]"),
        (dict(out_features=128, in_features=128, butterfly_size=8, n_factors=-1), "n_factors=-1"),
        (dict(out_features=100, in_features=128, butterfly_size=8, n_factors=1, block_size=16), "out_features=100 is not divisible by butterfly_size=8.*largest power of 2 dividing it: 4"),
        (dict(out_features=256, in_features=72, butterfly_size=16, n_factors=1, block_size=16), "in_features=72 is not divisible"),
        (dict(out_features=256, in_features=256, butterfly_size=16, n_factors=2), r"tiles 16 wide, smaller than block_size=32.*butterfly_size <= 8"),
        (dict(out_features=256, in_features=256, butterfly_size=4, n_factors=1, block_size=24), "block_size=24"),
    ],
)
def test_layout_rejects_bad_values_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        FlatButterflyLayout(**kwargs)


@pytest.mark.parametrize("rank", [-1, 65, 2.5])
def test_rank_validation(rank):
    with pytest.raises(ValueError, match=f"rank={rank}"):
        validate_rank(rank, 64, 128)


# (out, in) of every targeted matrix: GPT-2 small/medium (c_attn, c_proj, c_fc, mlp.c_proj),
# BERT-base and ViT-B (q/k/v/o, fc1, fc2)
MODEL_SHAPES = {
    "gpt2-small": [(2304, 768), (768, 768), (3072, 768), (768, 3072)],
    "gpt2-medium": [(3072, 1024), (1024, 1024), (4096, 1024), (1024, 4096)],
    "bert-base": [(768, 768), (3072, 768), (768, 3072)],
    "vit-b": [(768, 768), (3072, 768), (768, 3072)],
}


@pytest.mark.filterwarnings("ignore:.*does not fit density:UserWarning")  # at 10% the rank must drop: not the subject
@pytest.mark.parametrize("model", sorted(MODEL_SHAPES))
@pytest.mark.parametrize("budget", [0.1, 0.2, 0.25, 0.3, 0.4, 0.5])
@pytest.mark.parametrize("rank", [32, None], ids=["rank32", "rank-picked"])
def test_planner_fits_budget_and_spends_it(model, budget, rank):
    for out_f, in_f in MODEL_SHAPES[model]:
        plan = plan_matrix(out_f, in_f, budget, block_size=32, rank=rank)
        assert plan.density <= budget + 1e-12
        q, p = plan.layout.tile_shape
        assert min(q, p) >= 32
        assert plan == plan_matrix(out_f, in_f, budget, block_size=32, rank=rank)  # deterministic
        # no other valid layout with the same rank fits the budget with a denser sparse part
        lowrank = plan.rank * (out_f + in_f)
        for bs, k in _candidate_layouts(out_f, in_f, 32):
            sparse = (k + 1) * out_f * in_f // bs
            if sparse + lowrank <= budget * out_f * in_f:
                assert sparse <= plan.layout.num_params
        assert f"{in_f}->{out_f}" in plan.summary() and "budget" in plan.summary()


def test_planner_known_choices():
    plan = plan_matrix(3072, 768, 0.25, rank=32)
    assert (plan.butterfly_size, plan.n_factors, plan.rank) == (16, 2, 32)
    assert plan.density == pytest.approx(0.1875 + 32 * (3072 + 768) / (3072 * 768))
    # a small budget squeezes a requested rank before giving up, and says so
    with pytest.warns(UserWarning, match=r"1024->1024: low_rank=32 does not fit density=0.08 .* using rank 24"):
        tight = plan_matrix(1024, 1024, 0.08, rank=32)
    assert tight.rank < 32 and tight.density <= 0.08
    assert isinstance(tight, MatrixPlan)


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, "0.25"])
def test_planner_rejects_bad_density(density):
    with pytest.raises(ValueError, match="density="):
        plan_matrix(768, 768, density)


def test_planner_explains_impossible_budgets():
    with pytest.raises(ValueError, match=r"below the sparsest layout .* raise density or lower block_size"):
        plan_matrix(768, 768, 0.01)
    with pytest.raises(ValueError, match="no flat butterfly layout of 48->48"):
        plan_matrix(48, 48, 0.5, block_size=32)
    assert math.isclose(plan_matrix(768, 768, 1.0, rank=0).density, 1.0)


def _gpt2(n_embd: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=n_embd, n_head=4, vocab_size=64, n_positions=32))


@pytest.mark.parametrize("out_f, in_f, density, block_size, asked_32, picked", [
    # with rank 32 asked for only block-diagonal layouts (k = 0) fit; the planner's own pick keeps a butterfly
    (768, 768, 0.25, 32, (8, 0, 32), (16, 2, 24)),
    (768, 256, 0.25, 16, (16, 0, 32), (16, 2, 8)),      # the tiny GPT-2's c_attn
    (384, 384, 0.5, 32, (4, 0, 32), (8, 2, 24)),        # MiniLM's attention
    (3072, 768, 0.25, 32, (16, 2, 32), (16, 2, 32)),    # where 32 keeps a butterfly, it is the pick
    (384, 128, 0.25, 16, (8, 0, 8), (8, 0, 8)),         # no rank leaves room for a factor: the largest that fits
])
def test_planner_picks_the_largest_rank_that_keeps_a_butterfly_factor(out_f, in_f, density, block_size, asked_32,
                                                                      picked):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the planner's own pick is silent
        plan = plan_matrix(out_f, in_f, density, block_size=block_size)
    assert (plan.butterfly_size, plan.n_factors, plan.rank) == picked and plan.density <= density
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning of a lowered rank: test_planner_known_choices
        plan = plan_matrix(out_f, in_f, density, block_size=block_size, rank=32)
    assert (plan.butterfly_size, plan.n_factors, plan.rank) == asked_32


def test_planner_keeps_a_requested_rank_that_fits():
    # 4 fits beside the layout; rounding it down to a multiple of 8 would drop the low-rank term
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plan_matrix(768, 768, 0.25, rank=4).rank == 4


def test_block_size_128_on_gpt2_warns_that_the_rank_is_dropped_and_says_how_to_keep_it():
    """GPT-2's 768-wide matrices hold at most 4 tiles of 128 per side: the sparsest layout alone takes the whole
    25% budget, so the requested rank 32 cannot stay; the warning names the matrices and both ways out."""
    from pixelfly_hf import PixelflyConfig, get_model

    with pytest.warns(UserWarning) as caught:
        model = get_model(_gpt2(768), PixelflyConfig(block_size=128, low_rank=32, init="random"))
    messages = [str(w.message) for w in caught if "low_rank=32" in str(w.message)]
    assert len(messages) == 4  # one per matrix shape: c_attn, attn.c_proj, c_fc, mlp.c_proj
    assert {w.filename for w in caught} == {__file__}  # said at the get_model call
    assert any(
        m.startswith("transformer.h.0.attn.c_attn (768->2304): low_rank=32 does not fit density=0.25 with "
                     "block_size=128") and "using rank 0" in m and "raise density to 0.306, or lower block_size to 64"
        in m for m in messages
    )
    assert {spec["rank"] for spec in model.config.pixelfly["modules"].values()} == {0}


def test_following_the_advice_honours_the_rank_without_a_warning():
    from pixelfly_hf import PixelflyConfig, get_model

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model = get_model(_gpt2(768), PixelflyConfig(block_size=64, low_rank=32, init="random"))
    plans = model.config.pixelfly["modules"].values()
    assert {spec["rank"] for spec in plans} == {32}
    assert all(spec["butterfly_size"] == 8 for spec in plans)


def test_a_rank_above_the_matrix_size_is_lowered_with_a_warning():
    from pixelfly_hf import PixelflyConfig, get_model

    config = PixelflyConfig(target_modules=["mlp"], butterfly_size=2, n_factors=1, low_rank=100, block_size=16,
                            init="random")
    with pytest.warns(UserWarning) as record:
        model = get_model(_gpt2(64), config)
    messages = sorted(str(w.message) for w in record)
    assert len(messages) == 2  # one per shape: c_fc (64->256) and c_proj (256->64)
    assert messages[0].startswith("transformer.h.0.mlp.c_fc (64->256): low_rank=100 exceeds min(in, out) = 64; "
                                  "using rank 64")
    assert messages[1].startswith("transformer.h.0.mlp.c_proj (256->64): low_rank=100 exceeds")
    assert model.config.pixelfly["modules"]["h.0.mlp.c_fc"]["rank"] == 64
