"""Question: does a whole patched GPT-2 small give the same logits and gradients on the Triton kernels as on the
PyTorch reference path? Answer on an H200: yes (VERDICT: PASS, docs/dev/benchmarks-log.md).

    python research/check_models_gpu.py            # one CUDA GPU, bf16, about a minute, no network

Builds a random-init GPT-2 small (12 layers, 768 wide, 50257 vocab, dropout off), patches attention and MLP
matrices with get_model (density 0.25, block_size 32, low_rank 32, init="project" on the GPU so that the
low-rank factors are nonzero), casts to bf16, and runs one forward + backward of the LM loss on fresh random
tokens with every PixelflyLinear on backend="triton", then again on backend="reference" (same weights, same
inputs), and once more in fp32 (reference path). Compares the logits and the gradient of every parameter by
relative Frobenius error. Twelve bf16 layers put even the plain PyTorch path 1-2e-2 away from fp32 on some
gradients, so a tensor passes when the Triton run's error against fp32 is <= 1e-2 or no more than 1.5x the bf16
reference path's own error against fp32 (Triton is as accurate as PyTorch in the same precision).
Prints a table of the worst tensors and a final line "VERDICT: PASS" or "VERDICT: FAIL"; exit status 0 / 1.

CPU smoke run of the script itself (Triton interpreter; bf16 arithmetic is wrong there, so fp32):
    TRITON_INTERPRET=1 python research/check_models_gpu.py --device cpu --dtype float32 --n-layer 2 \
        --n-embd 128 --n-head 4 --vocab 1000 --seq 64 --batch 2 --block-size 16
"""
import argparse
import copy
import sys
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from pixelfly_hf import PixelflyConfig, PixelflyLinear, get_model

TOLERANCE = 1e-2


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    if not torch.isfinite(got).all():
        return float("inf")
    want = want.float()
    return ((got.float() - want).norm() / want.norm().clamp_min(1e-30)).item()


def set_backend(model, backend: str) -> None:
    for module in model.modules():
        if isinstance(module, PixelflyLinear):
            module.backend = backend


def forward_backward(model, tokens):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=tokens, labels=tokens)
    out.loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--n-layer", type=int, default=12)
    parser.add_argument("--n-embd", type=int, default=768)
    parser.add_argument("--n-head", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--density", type=float, default=0.25)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: this check needs a GPU (see the docstring for a CPU smoke run)")
        print("VERDICT: FAIL")
        return 1
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    start = time.perf_counter()

    config = GPT2Config(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, vocab_size=args.vocab,
                        n_positions=max(1024, args.seq), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    dense = GPT2LMHeadModel(config).to(args.device)
    model = get_model(dense, PixelflyConfig(density=args.density, target_modules=["attn", "mlp"],
                                            block_size=args.block_size, low_rank=32))
    summary = model.sparsity_summary()
    print(f"{summary['replaced_matrices']} matrices replaced, density {summary['density']:.2%}, params "
          f"{summary['total_params_pixelfly']:,} (dense {summary['total_params_dense']:,}); "
          f"setup {time.perf_counter() - start:.1f}s")
    fp32_model = copy.deepcopy(model).train()
    model = model.to(dtype).train()
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), device=args.device)

    set_backend(model, "triton")
    logits_triton, grads_triton = forward_backward(model, tokens)
    set_backend(model, "reference")
    logits_ref, grads_ref = forward_backward(model, tokens)
    set_backend(fp32_model, "reference")
    logits_fp32, grads_fp32 = forward_backward(fp32_model, tokens)

    if set(grads_triton) != set(grads_ref) or len(grads_ref) != sum(1 for _ in model.parameters()):
        print(f"gradient sets differ: triton {len(grads_triton)}, reference {len(grads_ref)}, "
              f"parameters {sum(1 for _ in model.parameters())}")
        print("VERDICT: FAIL")
        return 1
    def row(name, triton, ref, fp32):
        return name, rel_err(triton, ref), rel_err(triton, fp32), rel_err(ref, fp32)

    rows = [row("logits", logits_triton, logits_ref, logits_fp32)]
    rows += [row(f"grad {name}", grads_triton[name], grads_ref[name], grads_fp32[name]) for name in grads_ref]
    rows.sort(key=lambda r: -r[2] / max(r[3], TOLERANCE))
    failed = [r for r in rows if not r[2] <= max(TOLERANCE, 1.5 * r[3])]

    print(f"\n{len(rows)} tensors (logits + every parameter's gradient), {args.dtype}, {args.batch}x{args.seq} tokens; "
          f"worst first; pass: triton vs fp32 <= max({TOLERANCE}, 1.5 x reference vs fp32)")
    print(f"{'tensor':<56} {'triton vs ref':>14} {'triton vs fp32':>15} {'ref vs fp32':>12}")
    for name, err, tri32, floor in rows[:15]:
        print(f"{name:<56} {err:>14.2e} {tri32:>15.2e} {floor:>12.2e}")
    pixelfly_grads = [row for row in rows if row[0].endswith(("weight", "lowrank_u", "lowrank_v")) and ".c_" in row[0]]
    print(f"Pixelfly parameter gradients compared: {len(pixelfly_grads)}; total time {time.perf_counter() - start:.1f}s")
    if failed:
        print(f"{len(failed)} tensor(s) fail: " + ", ".join(r[0] for r in failed[:10]))
        print("VERDICT: FAIL")
        return 1
    worst = max(rows, key=lambda r: r[1])
    print(f"VERDICT: PASS (largest triton-vs-reference difference {worst[1]:.2e} on {worst[0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
