"""Pixelfly attention's Triton kernels (kernels/attention_*.py, block_sparse_attention.py): block tables, forward and backward against
a float64 masked softmax, key padding, ragged lengths, the custom op under torch.compile; on CPU in the interpreter."""
import os

import pytest
import torch

from pixelfly_kernels import attention_launch as launch
from pixelfly_kernels import block_sparse_attention as bsa
from pixelfly_kernels.butterfly_attention import PatternSpec, dense_pattern

# CPU tensors run on Triton only in its interpreter (conftest sets it when there is no GPU)
interpreted = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")


def float64_attention(q, k, v, keep, scale):
    """softmax over the allowed keys in float64; rows with no allowed key give 0."""
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    weights = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1).nan_to_num(0.0)
    return weights @ v.double()


def check_against_float64(attend, spec, causal, s, key_keep=None, b=2, h=3, d=32, seed=0):
    """attend(q, k, v) -> (B, H, S, D); compares output and all three gradients with the float64 reference."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, s, d, generator=gen).requires_grad_() for _ in range(3))
    grad = torch.randn(b, h, s, d, generator=gen)
    out = attend(q, k, v)
    out.backward(grad)
    keep = dense_pattern(s, s, spec, causal)[None, None]
    if key_keep is not None:
        keep = keep & key_keep[:, None, None, :]
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = float64_attention(*ref_in, keep, d**-0.5)
    ref.backward(grad.double())
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    for name, t, r in zip("qkv", (q, k, v), ref_in):
        torch.testing.assert_close(t.grad.double(), r.grad, atol=2e-5, rtol=1e-4, msg=lambda m: f"d{name}: {m}")
    return out, (q, k, v)


@interpreted
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("period, n_global", [(None, 32), (2, 0), (None, 64)])
def test_whole_blocks_are_the_pattern_tile_by_tile(causal, period, n_global):
    """Every tile the tables list is wholly allowed, every other tile (but the causal diagonal's triangle) is wholly
    disallowed: the kernels mask nothing else."""
    spec, nb, p = PatternSpec(32, period, 2, n_global), 10, 32
    tiles = dense_pattern(nb * p, nb * p, spec, causal).view(nb, p, nb, p).permute(0, 2, 1, 3)
    whole = launch.whole_blocks(nb, spec, causal)
    assert tiles[whole].all() and not tiles[~whole & ~torch.eye(nb, dtype=torch.bool)].any()
    diagonal = tiles[torch.arange(nb), torch.arange(nb)]
    assert diagonal.equal(torch.ones(p, p, dtype=torch.bool).tril().expand(nb, p, p) if causal else diagonal.new_ones(nb, p, p))


@interpreted
def test_tables_list_blocks_and_launch_heavy_blocks_first():
    tables = launch.block_tables(8 * 128, PatternSpec(128, None, 2, 128), True, torch.device("cpu"),
                                 launch.HEAVY_BLOCK_FACTOR)
    # causal: query block 5 sees the global block 0, its XOR partners 4 and 7 (not: later), and its neighbour 4
    assert tables.rows[5, : tables.n_rows[5]].tolist() == [0, 4]
    # the global key block is seen by every later query block: the one heavy column, launched first
    assert tables.n_cols[0] == 7 and tables.col_heavy == 1 and tables.col_order.tolist() == list(range(8))
    assert tables.row_heavy == 0 and tables.row_order.tolist() == list(range(8))
    tables = launch.block_tables(8 * 128, PatternSpec(128, None, 1, 256), False, torch.device("cpu"), heavy_factor=0.0)
    counts = tables.n_rows[tables.row_order]
    assert tables.row_heavy == 8 and (counts.diff() <= 0).all() and sorted(tables.row_order.tolist()) == list(range(8))


@interpreted
@pytest.mark.parametrize("heavy_factor", [0.0, 2.0, float("inf")])
def test_every_launch_order_gives_the_same_result(heavy_factor):
    """All programs heaviest first, some first and the rest head by head, or all head by head (tiles of 16 in
    32-token blocks: two programs per block)."""
    spec = PatternSpec(32, None, 1, 64)  # 16 blocks; the 2 global blocks see (and are seen by) all 16
    tables = launch.block_tables(512, spec, False, torch.device("cpu"), heavy_factor)
    assert (tables.row_heavy, tables.col_heavy) == {0.0: (16, 16), 2.0: (2, 2), float("inf"): (0, 0)}[heavy_factor]
    check_tiles(False, (16, 16), 512, spec, b=1, h=2, heavy_factor=heavy_factor)


@interpreted
def test_partial_global_blocks_are_refused():
    assert not launch.supports(PatternSpec(128, None, 3, 64))
    with pytest.raises(ValueError, match="64 global tokens do not fill whole 128-token blocks"):
        launch.block_tables(512, PatternSpec(128, None, 3, 64), True, torch.device("cpu"), 2.0)


@interpreted
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("s", [160, 150])  # 150: a ragged tail of 22 tokens, padded inside
def test_kernels_match_float64(causal, s):
    spec = PatternSpec(32, None, 2, 32)
    check_against_float64(lambda q, k, v: bsa.block_sparse_attention(q, k, v, spec, causal, 32**-0.5), spec, causal, s)


@interpreted
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("config", [(16, 32), (32, 16)])
def test_tiles_smaller_than_the_pattern_block(causal, config):
    """Several programs per pattern block (forward and dQ rows, dK/dV columns) and several steps per block."""
    check_tiles(causal, config, 128, PatternSpec(32, None, 2, 32))


def check_tiles(causal, config, s, spec, b=2, h=3, heavy_factor=launch.HEAVY_BLOCK_FACTOR):
    """The launchers with fixed tiles (and a launch order), forward and backward, against float64."""

    class Attend(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            out, lse = launch.attention_forward(q, k, v, None, spec, causal, 32**-0.5, config, heavy_factor)
            ctx.save_for_backward(q, k, v, out, lse)
            return out

        @staticmethod
        def backward(ctx, grad):
            return launch.attention_backward(*ctx.saved_tensors, grad, None, spec, causal, 32**-0.5, config,
                                             heavy_factor)

    check_against_float64(Attend.apply, spec, causal, s, b=b, h=h)


@interpreted
# the interpreter evaluates log2(0) of the row with no key in numpy, which warns; the kernel handles that row
@pytest.mark.filterwarnings("ignore:divide by zero encountered in log2:RuntimeWarning")
@pytest.mark.parametrize("causal", [True, False])
def test_key_padding_and_a_row_with_no_key(causal):
    """Batch row 0 pads its last 40 keys; batch row 1 keeps no key at all: zeros there, not NaN, in output and grads."""
    spec, s = PatternSpec(32, None, 2, 32), 130
    key_keep = torch.ones(2, s, dtype=torch.bool)
    key_keep[0, -40:] = False
    key_keep[1] = False
    out, (q, k, v) = check_against_float64(
        lambda q, k, v: bsa.block_sparse_attention(q, k, v, spec, causal, 32**-0.5, key_keep), spec, causal, s,
        key_keep=key_keep)
    assert out[1].abs().max() == 0 and all(t.grad[1].abs().max() == 0 for t in (q, k, v))


@interpreted
def test_strided_inputs_and_output_layout():
    """q, k, v as transformers passes them (views of one (B, S, 3, H, D) projection); the output is (B, S, H, D) in
    memory, so the attention function's transpose back needs no copy."""
    spec = PatternSpec(32, None, 2, 32)
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(2, 96, 3, 2, 32, generator=gen)
    q, k, v = qkv.unbind(2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D), strided
    out = bsa.block_sparse_attention(q, k, v, spec, True, 0.2)
    assert out.transpose(1, 2).is_contiguous()
    keep = dense_pattern(96, 96, spec, True)
    torch.testing.assert_close(out.double(), float64_attention(q, k, v, keep, 0.2), atol=2e-5, rtol=1e-4)


@interpreted
def test_inputs_in_different_layouts():
    """q a transposed projection, k and v contiguous (as after repeating grouped K/V heads): made one layout once,
    forward and backward right; the launchers themselves refuse mixed strides."""
    spec = PatternSpec(32, None, 2, 32)
    check_against_float64(lambda q, k, v: bsa.block_sparse_attention(q.transpose(1, 2).contiguous().transpose(1, 2),
                                                                     k, v, spec, True, 32**-0.5), spec, True, 96)
    q = torch.randn(1, 96, 2, 32).transpose(1, 2)
    k = torch.randn(1, 2, 96, 32)
    with pytest.raises(ValueError, match="one stride set"):
        launch.attention_forward(q, k, k, None, spec, True, 0.2)


@interpreted
def test_bad_inputs_name_the_value():
    spec = PatternSpec(32, None, 2, 32)
    q = torch.randn(1, 2, 64, 48)
    with pytest.raises(ValueError, match="head_dim=48"):
        bsa.block_sparse_attention(q, q, q, spec, True, 0.1)
    q = torch.randn(1, 2, 64, 32)
    with pytest.raises(ValueError, match=r"pass a \(1, 64\) bool tensor"):
        bsa.block_sparse_attention(q, q, q, spec, True, 0.1, torch.ones(1, 63, dtype=torch.bool))


@interpreted
def test_custom_op_compiles_without_graph_breaks():
    """fullgraph torch.compile (aot_eager: fake-tensor tracing of the op and its backward, no C++ compiler) gives
    the eager result; opcheck validates the op's fake and autograd registrations."""
    spec = PatternSpec(32, None, 2, 32)
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 64, 32, generator=gen).requires_grad_() for _ in range(3))

    def loss(q, k, v):
        return bsa.block_sparse_attention(q, k, v, spec, True, 0.2).square().sum()

    eager = torch.autograd.grad(loss(q, k, v), (q, k, v))
    compiled = torch.autograd.grad(torch.compile(loss, backend="aot_eager", fullgraph=True)(q, k, v), (q, k, v))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)
    torch.library.opcheck(bsa._attention_op, (q, k, v, None, True, 0.2, 32, 0, 2, 32))


@interpreted
def test_the_registered_function_dispatches_to_the_kernels_where_they_apply(monkeypatch):
    """The GPU dispatch rules, run on CPU in the interpreter: whole-block global tokens, fp16, no mask or a key padding
    mask -> our kernels; 16 global tokens in 32-token blocks, or a general 4-D mask -> FlexAttention."""
    import pixelfly_hf.layers.attention as attention

    flex_calls = []
    monkeypatch.setattr(attention, "flex_pixelfly_attention", lambda *args: flex_calls.append(args) or args[0])
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 96, 32, generator=gen).half() for _ in range(3))
    key_keep = torch.ones(2, 96, dtype=torch.bool)
    key_keep[1, 70:] = False
    padding = torch.ones(96, 96, dtype=torch.bool)[None, None] & key_keep[:, None, None]  # what sdpa_mask builds
    general = padding & torch.rand(2, 1, 96, 96, generator=gen).gt(0.1)
    spec = PatternSpec(32, None, 2, 32)
    for keep, keys in ((None, None), (padding, key_keep)):
        out = attention._gpu_pixelfly_attention(q, k, v, spec, False, 0.2, keep)
        allowed = dense_pattern(96, 96, spec, False)[None, None] & (True if keys is None else keys[:, None, None])
        torch.testing.assert_close(out.double(), float64_attention(q, k, v, allowed, 0.2), atol=2e-3, rtol=2e-3)
    assert not flex_calls
    attention._gpu_pixelfly_attention(q, k, v, PatternSpec(32, None, 2, 16), False, 0.2, None)
    attention._gpu_pixelfly_attention(q, k, v, spec, False, 0.2, general)
    attention._gpu_pixelfly_attention(q.float(), k.float(), v.float(), spec, False, 0.2, None)
    assert len(flex_calls) == 3


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("d", [64, 128])
def test_kernels_bf16_on_gpu_match_float32(causal, d):
    """GPU, autotuned: bf16 against fp32 masked softmax, a ragged length and key padding; the second call, through
    the launch cache, gives the same output."""
    spec, s = PatternSpec(128, None, 3, 128), 1000
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, grad = (torch.randn(2, 4, s, d, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(4))
    key_keep = torch.ones(2, s, dtype=torch.bool, device="cuda")
    key_keep[1, 700:] = False
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    out = bsa.block_sparse_attention(*ins, spec, causal, d**-0.5, key_keep)
    out.backward(grad)
    with torch.no_grad():
        again = bsa.block_sparse_attention(*ins, spec, causal, d**-0.5, key_keep)
    assert torch.equal(again, out)
    ref_in = [t.float().requires_grad_() for t in (q, k, v)]
    keep = dense_pattern(s, s, spec, causal, device="cuda")[None, None] & key_keep[:, None, None, :]
    ref = torch.nn.functional.scaled_dot_product_attention(*ref_in, attn_mask=keep)
    ref.backward(grad.float())
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    for t, r in zip(ins, ref_in):
        torch.testing.assert_close(t.grad.float(), r.grad, atol=5e-2, rtol=5e-2)
