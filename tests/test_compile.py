"""torch.compile over Pixelfly: the butterfly products stay opaque ops in the compiled graph (no graph break, no
trace into the Triton kernels or their autotuner), and compiled outputs and gradients equal eager ones.

On CPU the Triton kernels run in the interpreter under torch.compile(backend="aot_eager", fullgraph=True): Dynamo
and AOTAutograd trace every op with fake tensors as they do on the GPU, then run it on real tensors; and under
Inductor with its CPU code generation. On a GPU (marked
gpu): Inductor with and without CUDA graphs, for PixelflyLinear and patched GPT-2, BERT and ViT with Pixelfly
attention on its Triton kernels, in bf16 autocast as the recipes train.
"""
import os

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, ViTConfig, ViTForImageClassification

from pixelfly_hf import PixelflyConfig, PixelflyLinear, get_model
from pixelfly_kernels.reference import butterfly_to_dense

ON_CPU_TRITON = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.double()
    return ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()


def set_backend(model: torch.nn.Module, backend: str) -> None:
    for module in model.modules():
        if isinstance(module, PixelflyLinear):
            module.backend = backend


def random_linear(in_f, out_f, bs, k, rank, **kw):
    layer = PixelflyLinear(in_f, out_f, butterfly_size=bs, n_factors=k, rank=rank, block_size=16, backend="triton", **kw)
    with torch.no_grad():  # U starts at zero: randomise every parameter so each term is tested
        for param in layer.parameters():
            param.normal_(std=0.5)
    return layer


def float64_linear(layer: PixelflyLinear, x: torch.Tensor):
    """The layer's function written densely in float64: output and the gradients of sum(y * probe)."""
    params = {name: p.detach().double().requires_grad_() for name, p in layer.named_parameters()}
    x64 = x.detach().double().requires_grad_()
    y = x64 @ butterfly_to_dense(params["weight"]).T + params["bias"]
    if layer.rank:
        y = y + x64 @ (params["lowrank_u"] @ params["lowrank_v"]).T
    return y, x64, params


@ON_CPU_TRITON
@pytest.mark.parametrize("shape", [(64, 128, 4, 2, 8, 37), (96, 48, 2, 1, 0, 21)], ids=["rank8-37tokens", "rank0-21tokens"])
def test_compiled_triton_linear_matches_float64(shape):
    """fullgraph aot_eager over the "triton" backend: the fake-tensor trace of forward and backward, then the
    interpreted kernels, against a dense float64 oracle on fresh random inputs (odd token counts)."""
    torch.manual_seed(0)
    torch._dynamo.reset()
    in_f, out_f, bs, k, rank, tokens = shape
    layer = random_linear(in_f, out_f, bs, k, rank)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(tokens, in_f, requires_grad=True)
    probe = torch.randn(tokens, out_f)
    y = compiled(x)
    (y * probe).sum().backward()
    want, x64, params = float64_linear(layer, x)
    (want * probe.double()).sum().backward()
    assert rel_err(y, want) < 1e-5
    assert rel_err(x.grad, x64.grad) < 1e-5
    for name, param in layer.named_parameters():
        assert rel_err(param.grad, params[name].grad) < 1e-5, name


def test_compiled_graph_calls_the_products_as_opaque_ops():
    """What torch.compile hands its backend: the forward graph calls pixelfly.butterfly_mm, the backward
    butterfly_mm_t and butterfly_mm_dw, and nothing traces into Triton (a traced kernel or autotuner is where
    compiled Pixelfly broke on the GPU: fake tensors have no address, and Dynamo prunes copies of the configs)."""
    torch._dynamo.reset()
    seen = {"forward": [], "backward": []}

    def record(which):
        def compiler(graph, example_inputs):
            seen[which] += [str(node.target) for node in graph.graph.nodes if node.op == "call_function"]
            return make_boxed_func(graph)
        return compiler

    layer = random_linear(64, 128, 4, 2, 8, bias=True)
    layer.backend = "reference"  # what the graph holds is the same for both backends
    compiled = torch.compile(layer, backend=aot_autograd(fw_compiler=record("forward"), bw_compiler=record("backward")),
                             fullgraph=True)
    compiled(torch.randn(9, 64, requires_grad=True)).sum().backward()
    assert "pixelfly.butterfly_mm.default" in seen["forward"]
    assert {"pixelfly.butterfly_mm_t.default", "pixelfly.butterfly_mm_dw.default"} <= set(seen["backward"])
    everything = seen["forward"] + seen["backward"]
    assert not [t for t in everything if "triton" in t.lower()], everything


def gpt2_case(device, size):
    width, seq = size
    config = GPT2Config(n_layer=2, n_embd=width, n_head=4, vocab_size=512, n_positions=seq, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    ids = torch.randint(0, 512, (2, seq), device=device)
    return GPT2LMHeadModel(config), {"input_ids": ids, "labels": ids}


def bert_case(device, size):
    width, seq = size
    config = BertConfig(num_hidden_layers=2, hidden_size=width, num_attention_heads=4, intermediate_size=4 * width,
                        vocab_size=512, max_position_embeddings=seq, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    ids = torch.randint(0, 512, (2, seq), device=device)
    mask = torch.ones_like(ids)
    mask[1, seq - seq // 4:] = 0  # a padded row: the key padding mask reaches the attention
    return BertForMaskedLM(config), {"input_ids": ids, "attention_mask": mask, "labels": ids}


def vit_case(device, size):
    width, seq = size
    image = 8 * int((seq - 1) ** 0.5)  # 8-pixel patches: seq - 1 patches plus the class token
    config = ViTConfig(num_hidden_layers=2, hidden_size=width, num_attention_heads=4, intermediate_size=4 * width,
                       image_size=image, patch_size=8, num_labels=10, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0)
    return ViTForImageClassification(config), {"pixel_values": torch.randn(2, 3, image, image, device=device),
                                               "labels": torch.tensor([1, 7], device=device)}


CASES = {"gpt2": gpt2_case, "bert": bert_case, "vit": vit_case}


def patched(case, device, size, attention_block):
    torch.manual_seed(0)
    model, inputs = CASES[case](device, size)
    attention = {"block_size": attention_block, "n_factors": 1, "n_global_tokens": attention_block,
                 "min_seq_len_for_sparse": 2 * attention_block, "max_density_for_sparse": 1.0}
    config = PixelflyConfig(density=0.5, block_size=16, low_rank=8, init="random", attention="pixelfly",
                            attention_config=attention)
    model = get_model(model, config).to(device)
    with torch.no_grad():  # U starts at zero: give the low-rank term a say in the gradients
        for name, param in model.named_parameters():
            if name.endswith("lowrank_u"):
                param.normal_(std=0.02)
    return model, inputs


def loss_and_grads(model, inputs, run=None, steps=1, autocast=False):
    """The loss and every gradient of the last of `steps` training steps of `run` (default: the model itself, else
    its compiled version) on the same batch, without an update."""
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            loss = (model if run is None else run)(**inputs).loss
        loss.backward()
    return loss.detach().float().clone(), {n: p.grad.float().clone() for n, p in model.named_parameters()
                                           if p.grad is not None}


@ON_CPU_TRITON
@pytest.mark.parametrize("case", list(CASES))
def test_compiled_patched_models_on_the_triton_kernels_match_eager(case):
    """fullgraph aot_eager over a patched model whose every PixelflyLinear runs the interpreted Triton kernels (the
    attention takes its CPU reference path): no graph break, and the loss and all gradients equal eager ones."""
    torch._dynamo.reset()
    model, inputs = patched(case, "cpu", (64, 65 if case == "vit" else 64), attention_block=16)
    set_backend(model, "triton")
    eager_loss, eager_grads = loss_and_grads(model, inputs)
    loss, grads = loss_and_grads(model, inputs, torch.compile(model, backend="aot_eager", fullgraph=True))
    assert rel_err(loss, eager_loss) < 1e-5
    assert grads.keys() == eager_grads.keys() and any("lowrank_v" in n for n in grads)
    for name, grad in grads.items():
        assert rel_err(grad, eager_grads[name]) < 1e-4, name


@ON_CPU_TRITON
def test_inductor_over_the_triton_kernels_matches_eager():
    """Inductor itself (its CPU code generation; the GPU adds only CUDA graphs) compiling a patched GPT-2 whose
    products run the interpreted Triton kernels: it lowers the ops as calls into our launchers, with outputs laid out
    as the fake implementations promise, through forward and backward."""
    torch._dynamo.reset()
    model, inputs = patched("gpt2", "cpu", (64, 64), attention_block=16)
    set_backend(model, "triton")
    eager_loss, eager_grads = loss_and_grads(model, inputs)
    loss, grads = loss_and_grads(model, inputs, torch.compile(model, fullgraph=True))
    assert rel_err(loss, eager_loss) < 1e-5
    for name, grad in grads.items():
        assert rel_err(grad, eager_grads[name]) < 1e-4, name


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_triton_linear_on_gpu_matches_eager(mode):
    """Inductor, with and without CUDA graphs, over PixelflyLinear in bf16: the autotuned kernels in the compiled
    graph give the eager outputs and gradients (512 tokens of 1024 -> 4096: the dW token-split kernel's shape)."""
    torch.manual_seed(11)
    torch._dynamo.reset()
    layer = PixelflyLinear(1024, 4096, butterfly_size=16, n_factors=2, rank=32, block_size=16, backend="triton",
                           device="cuda", dtype=torch.bfloat16)
    torch.nn.init.normal_(layer.lowrank_u, std=0.02)
    x = torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    params = (x, layer.weight, layer.bias, layer.lowrank_u, layer.lowrank_v)

    def step(fn):
        for t in params:
            t.grad = None
        torch.compiler.cudagraph_mark_step_begin()
        y = fn(x)
        y.float().square().sum().backward()
        return y.detach().clone(), [t.grad.clone() for t in params]

    y_eager, grads_eager = step(layer)
    compiled = torch.compile(layer, mode=mode, fullgraph=True)
    for _ in range(3):  # CUDA graphs: warm-up, record, replay
        y_comp, grads_comp = step(compiled)
    assert rel_err(y_comp, y_eager) < 1e-2
    for got, want in zip(grads_comp, grads_eager):
        assert rel_err(got, want) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
@pytest.mark.parametrize("case", list(CASES))
def test_compiled_patched_models_on_gpu_match_eager(case, mode):
    """Inductor, with and without CUDA graphs, over patched GPT-2, BERT (with a padded row) and ViT with Pixelfly
    attention on its Triton kernels (128-token blocks, sparse from 256 tokens), bf16 autocast: no graph break, and
    the loss and every gradient of the third compiled step (CUDA graphs: a replay) equal eager ones."""
    torch._dynamo.reset()
    model, inputs = patched(case, "cuda", (256, 257 if case == "vit" else 512), attention_block=128)
    explanation = torch._dynamo.explain(model)(**inputs)
    assert explanation.graph_break_count == 0, [r.reason.splitlines()[0] for r in explanation.break_reasons]
    eager_loss, eager_grads = loss_and_grads(model, inputs, autocast=True)
    loss, grads = loss_and_grads(model, inputs, torch.compile(model, mode=mode), steps=3, autocast=True)
    assert rel_err(loss, eager_loss) < 2e-2
    assert grads.keys() == eager_grads.keys()
    for name, grad in grads.items():
        assert rel_err(grad, eager_grads[name]) < 5e-2, name
