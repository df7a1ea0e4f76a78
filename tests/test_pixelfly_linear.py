import pytest
import torch
from backends import BACKENDS
from torch import nn
from transformers.pytorch_utils import Conv1D

from pixelfly_hf import PixelflyLinear
from pixelfly_kernels.ops import butterfly_mm
from pixelfly_kernels.reference import butterfly_to_dense

# (in, out, butterfly_size, n_factors, rank, batch shape)
CONFIGS = [
    (64, 128, 4, 2, 8, (37,)),
    (128, 64, 4, 1, 0, (2, 9)),
    (96, 48, 2, 1, 4, (3, 5, 2)),
    (256, 128, 8, 3, 16, (21,)),
]


def random_layer(in_f, out_f, bs, k, rank, gate=False, backend="reference", dtype=torch.float32):
    layer = PixelflyLinear(in_f, out_f, butterfly_size=bs, n_factors=k, rank=rank, block_size=16, gate=gate, backend=backend, dtype=dtype)
    with torch.no_grad():  # U starts at zero: randomise every parameter so each term is tested
        for param in layer.parameters():
            param.normal_()
    return layer


def float64_reference(layer, x):
    """The layer's function written densely in float64 with plain autograd."""
    params = {name: p.detach().double().requires_grad_() for name, p in layer.named_parameters()}
    x64 = x.detach().double().requires_grad_()
    sparse = x64 @ butterfly_to_dense(params["weight"]).T
    low = x64 @ (params["lowrank_u"] @ params["lowrank_v"]).T if layer.rank else torch.zeros_like(sparse)
    if layer.gate is not None:
        g = torch.sigmoid(x64 @ params["gate.weight"].T + params["gate.bias"])
        y = (1 - g) * sparse + g * low
    else:
        y = sparse + low
    if layer.bias is not None:
        y = y + params["bias"]
    return y, x64, params


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c[0]}to{c[1]}_bs{c[2]}k{c[3]}r{c[4]}")
def test_forward_and_all_gradients_match_float64(backend, gate, cfg):
    in_f, out_f, bs, k, rank, batch = cfg
    torch.manual_seed(sum(cfg[:5]) + gate)
    layer = random_layer(in_f, out_f, bs, k, rank, gate=gate, backend=backend)
    x = torch.randn(*batch, in_f, requires_grad=True)
    y = layer(x)
    assert y.shape == (*batch, out_f)
    y_ref, x64, params = float64_reference(layer, x)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad.double())
    def rel(a, b):
        return ((a.double() - b).norm() / b.norm()).item()
    assert rel(y, y_ref) < 1e-5
    assert rel(x.grad, x64.grad) < 1e-5
    for name, param in layer.named_parameters():
        assert rel(param.grad, params[name].grad) < 1e-5, name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frozen", [("weight",), ("lowrank_u",), ("lowrank_v", "bias")], ids="+".join)
def test_frozen_parameters_get_no_gradient_and_the_rest_stay_exact(backend, frozen):
    """The op skips the products of frozen parameters (training only the low-rank term, say); the others stay exact."""
    torch.manual_seed(len(frozen))
    layer = random_layer(96, 192, 4, 2, 8, backend=backend)
    for name in frozen:
        getattr(layer, name).requires_grad_(False)
    x = torch.randn(29, 96, requires_grad=True)
    y = layer(x)
    y_ref, x64, params = float64_reference(layer, x)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad.double())
    assert ((x.grad.double() - x64.grad).norm() / x64.grad.norm()).item() < 1e-5
    for name, param in layer.named_parameters():
        if name in frozen:
            assert param.grad is None, name
        else:
            assert ((param.grad.double() - params[name].grad).norm() / params[name].grad.norm()).item() < 1e-5, name


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_matches_float64(backend):
    torch.manual_seed(3)
    layer = random_layer(128, 256, 8, 2, 16, backend=backend, dtype=torch.float16)
    x = torch.randn(41, 128, dtype=torch.float16, requires_grad=True)
    y = layer(x)
    y_ref, x64, _ = float64_reference(layer, x)
    assert y.dtype == torch.float16
    assert ((y.double() - y_ref).norm() / y_ref.norm()).item() < 4e-3
    y.backward(torch.ones_like(y))
    y_ref.backward(torch.ones_like(y_ref))
    assert ((x.grad.double() - x64.grad).norm() / x64.grad.norm()).item() < 4e-3


def test_autocast_runs_in_the_autocast_dtype():
    torch.manual_seed(4)
    layer = random_layer(64, 128, 4, 2, 8)
    x = torch.randn(10, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer.weight.grad.dtype == torch.float32
    assert ((y.double() - float64_reference(layer, x)[0]).norm() / y.double().norm()).item() < 2e-2


def test_to_dense_is_what_forward_applies():
    torch.manual_seed(5)
    layer = random_layer(96, 192, 4, 2, 8)
    x = torch.randn(13, 96)
    assert torch.allclose(layer(x), x @ layer.to_dense().T + layer.bias, atol=1e-4, rtol=1e-5)
    assert layer.to_dense().shape == (192, 96)
    gated = random_layer(96, 192, 4, 2, 8, gate=True)
    with pytest.raises(ValueError, match="gate=True"):
        gated.to_dense()


def test_init_keeps_the_dense_layers_output_variance():
    torch.manual_seed(6)
    dense = nn.Linear(1024, 1024, bias=False)
    layer = PixelflyLinear(1024, 1024, bias=False, butterfly_size=16, n_factors=2, rank=32)
    x = torch.randn(4096, 1024)
    with torch.no_grad():
        ratio = layer(x).var() / dense(x).var()
    assert 0.85 < ratio.item() < 1.15
    assert layer.lowrank_u.abs().sum() == 0 and layer.lowrank_v.abs().sum() > 0


@pytest.mark.parametrize("rank,gate", [(0, False), (16, False), (16, True)])
def test_from_dense_is_exact_on_a_structured_matrix(rank, gate):
    torch.manual_seed(7)
    source = random_layer(128, 256, 8, 2, rank)
    linear = nn.Linear(128, 256)
    with torch.no_grad():
        linear.weight.copy_(source.to_dense())
    # alternating projections converge linearly on S + L; with rank 0 one step is exact
    errors = [
        PixelflyLinear.from_dense(linear, butterfly_size=8, n_factors=2, rank=rank, block_size=16, gate=gate, n_iter=n).projection_error
        for n in (1, 10, 100)
    ]
    assert errors[2] < 1e-4
    if rank:
        assert errors[0] > errors[1] > errors[2]
    layer = PixelflyLinear.from_dense(linear, butterfly_size=8, n_factors=2, rank=rank, block_size=16, gate=gate, n_iter=100)
    x = torch.randn(7, 128)
    assert torch.allclose(layer(x), linear(x), atol=1e-3, rtol=1e-3)


def test_from_dense_projection_error_and_conv1d():
    torch.manual_seed(8)
    conv = Conv1D(256, 128)  # GPT-2 style: weight stored (in, out)
    nn.init.normal_(conv.weight)
    linear = nn.Linear(128, 256)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    errors = []
    for rank in (0, 8, 32):
        from_conv = PixelflyLinear.from_dense(conv, butterfly_size=4, n_factors=1, rank=rank, block_size=16)
        from_linear = PixelflyLinear.from_dense(linear, butterfly_size=4, n_factors=1, rank=rank, block_size=16)
        assert torch.allclose(from_conv.to_dense(), from_linear.to_dense(), atol=1e-5)
        dense = linear.weight.detach()
        expected = ((dense - from_linear.to_dense()).norm() / dense.norm()).item()
        assert from_linear.projection_error == pytest.approx(expected, rel=1e-4)
        errors.append(from_linear.projection_error)
    assert errors[0] > errors[1] > errors[2]
    # keeping half the tiles of a random matrix keeps about half of its energy
    assert errors[0] == pytest.approx((1 - 0.5) ** 0.5, abs=0.05)


def correlated_inputs(n, width, seed):
    """Inputs whose directions carry very different energy and correlate across the tiles, as activations do."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(width, width, generator=gen, dtype=torch.float64) / width**0.5
    return torch.randn(n, width, generator=gen, dtype=torch.float64) @ torch.diag(torch.logspace(-2, 1, width,
                                                                                              dtype=torch.float64)) @ mix


def test_covariance_fit_of_the_tiles_is_the_least_squares_fit_of_the_outputs():
    """rank 0: each output row's kept weights are the least-squares fit of that row's outputs on the inputs (with the
    1% damping as extra rows), solved here by lstsq over the row's own input columns, in float64."""
    torch.manual_seed(20)
    x = correlated_inputs(600, 64, seed=1)
    cov = x.T @ x / len(x)
    dense = torch.randn(96, 64, dtype=torch.float64)
    layer = PixelflyLinear(64, 96, butterfly_size=4, n_factors=1, rank=0, block_size=16)
    nn.init.normal_(layer.weight)  # poisoned: every tile must be overwritten
    layer.project_(dense, input_covariance=cov)
    damped = torch.cat([x / len(x) ** 0.5, (0.01 * cov.diagonal().mean()) ** 0.5 * torch.eye(64, dtype=torch.float64)])
    got = butterfly_to_dense(layer.weight.detach().double())
    for row in range(0, 96, 7):
        kept = got[row] != 0
        assert kept.sum() == 32  # 2 of 4 tiles of 16 columns
        want = torch.linalg.lstsq(damped[:, kept], damped @ dense[row]).solution
        torch.testing.assert_close(got[row, kept], want, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("rank", [0, 8])
def test_covariance_fit_reproduces_the_outputs_better_than_the_weight_fit(rank):
    torch.manual_seed(21)
    x = correlated_inputs(2000, 64, seed=2)
    dense = torch.randn(96, 64, dtype=torch.float64)

    def output_error(layer):
        return ((x @ (dense - layer.to_dense().double()).T).norm() / (x @ dense.T).norm()).item()

    by_weights = PixelflyLinear(64, 96, butterfly_size=4, n_factors=1, rank=rank, block_size=16)
    by_weights.project_(dense)
    by_outputs = PixelflyLinear(64, 96, butterfly_size=4, n_factors=1, rank=rank, block_size=16)
    reported = by_outputs.project_(dense, input_covariance=x.T @ x / len(x))
    assert output_error(by_outputs) < 0.8 * output_error(by_weights)
    assert reported == pytest.approx(output_error(by_outputs), rel=1e-3)
    # an identity covariance asks for the weight fit
    same = PixelflyLinear(64, 96, butterfly_size=4, n_factors=1, rank=rank, block_size=16)
    assert same.project_(dense, input_covariance=torch.eye(64)) == pytest.approx(by_weights.projection_error, rel=1e-3)
    with pytest.raises(ValueError, match=r"input_covariance has shape \(32, 32\); expected \(64, 64\)"):
        same.project_(dense, input_covariance=torch.eye(32))


def test_bad_arguments_raise_with_the_value():
    with pytest.raises(ValueError, match="butterfly_size=6"):
        PixelflyLinear(96, 96, butterfly_size=6, n_factors=1)
    with pytest.raises(ValueError, match="rank=200"):
        PixelflyLinear(128, 128, butterfly_size=4, n_factors=1, rank=200)
    with pytest.raises(ValueError, match="backend='cuda'"):
        PixelflyLinear(128, 128, butterfly_size=4, n_factors=1, backend="cuda")
    layer = PixelflyLinear(128, 128, butterfly_size=4, n_factors=1)
    with pytest.raises(ValueError, match="input has 64 features"):
        layer(torch.randn(3, 64))
    with pytest.raises(TypeError, match="nn.Linear or transformers Conv1D"):
        PixelflyLinear.from_dense(nn.Conv2d(3, 3, 1), butterfly_size=4, n_factors=1)


def test_extra_repr_shows_layout():
    text = repr(PixelflyLinear(768, 3072, butterfly_size=16, n_factors=2, rank=32))
    assert "tiles 192x48" in text and "density 18.75%" in text and "rank=32" in text


def test_custom_op_registration_is_consistent():
    torch.manual_seed(9)
    x = torch.randn(9, 64, requires_grad=True)
    w = torch.randn(4, 3, 32, 16, requires_grad=True)
    b = torch.randn(128, requires_grad=True)
    u = torch.randn(128, 8, requires_grad=True)
    v = torch.randn(8, 64, requires_grad=True)
    torch.library.opcheck(butterfly_mm, (x, w, b, u, v, "reference"))
    torch.library.opcheck(butterfly_mm, (x, w, None, None, None, "reference"))


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(10)
    torch._dynamo.reset()
    layer = random_layer(64, 128, 4, 2, 8)
    model = nn.Sequential(layer, nn.GELU(), nn.Linear(128, 64))
    compiled = torch.compile(model, fullgraph=True)  # fullgraph raises on any graph break
    x = torch.randn(2, 11, 64)
    y_eager = model(x)
    y_comp = compiled(x)
    assert torch.allclose(y_eager, y_comp, atol=1e-5)
    y_comp.sum().backward()
    grad_compiled = layer.weight.grad.clone()
    layer.weight.grad = None
    y_eager.sum().backward()
    assert torch.allclose(grad_compiled, layer.weight.grad, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eager_calls_skip_the_custom_op_and_match_it(backend, monkeypatch):
    """Eager layers run the products through an autograd.Function, not the custom op (whose dispatch cost more host
    time than the kernels run, session 6); the op stays what torch.compile traces. Both must give the same output
    and the same gradients for every input, the low-rank factors included."""
    from pixelfly_kernels import ops

    torch.manual_seed(12)
    x, w, b = torch.randn(37, 128), torch.randn(8, 3, 32, 16), torch.randn(256)
    u, v = torch.randn(256, 8), torch.randn(8, 128)
    grad = torch.randn(37, 256)

    def run(fn):
        ins = [t.clone().requires_grad_() for t in (x, w, b, u, v)]
        y, _ = fn(*ins, backend)
        y.backward(grad)
        return [y.detach()] + [t.grad for t in ins]

    through_op = run(ops.butterfly_mm)
    for name in ("butterfly_mm", "butterfly_mm_t", "butterfly_mm_dw"):
        monkeypatch.setattr(ops, name, lambda *a, _name=name: pytest.fail(f"an eager call went through the {_name} op"))
    direct = run(ops.butterfly_linear)
    for got, want in zip(direct, through_op):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-4)
