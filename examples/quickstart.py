"""PixelflyLinear in a GPT-2-shaped MLP stack, trained on CPU in a few minutes.

    python examples/quickstart.py

A 2-block residual MLP (the feed-forward half of a small GPT-2: LayerNorm -> fc1 -> GELU -> fc2, 256 -> 1024 ->
256) learns to imitate a fixed random teacher network. The same stack is trained twice, with dense nn.Linear and
with PixelflyLinear at a quarter of the weights (a 16x16 butterfly with 2 factors plus a low-rank term, as the
planner picks them), and the script prints both losses and what Pixelfly saves.
"""
import time

import torch
from torch import nn

from pixelfly_hf import PixelflyLinear, plan_matrix

EMBED, HIDDEN, BLOCKS, STEPS, BATCH = 256, 1024, 2, 200, 16


class MLPBlock(nn.Module):
    def __init__(self, make_linear):
        super().__init__()
        self.norm = nn.LayerNorm(EMBED)
        self.fc1 = make_linear(EMBED, HIDDEN)
        self.fc2 = make_linear(HIDDEN, EMBED)

    def forward(self, x):
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))


def pixelfly_linear(in_features, out_features, density=0.25):
    plan = plan_matrix(out_features, in_features, density, block_size=16)  # the planner picks the rank too
    print("  plan:", plan.summary())
    return PixelflyLinear(in_features, out_features, butterfly_size=plan.butterfly_size, n_factors=plan.n_factors,
                          rank=plan.rank, block_size=plan.block_size)


def train(model, teacher, label):
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    start = time.perf_counter()
    for step in range(STEPS + 1):
        x = torch.randn(BATCH, 16, EMBED)
        with torch.no_grad():
            target = teacher(x)
        loss = nn.functional.mse_loss(model(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            print(f"  {label:<9} step {step:4d}  loss {loss.item():.4f}")
    return loss.item(), time.perf_counter() - start


def matrix_params(model):
    return sum(m.num_params_structured if isinstance(m, PixelflyLinear) else m.weight.numel()
               for m in model.modules() if isinstance(m, (nn.Linear, PixelflyLinear)))


def main():
    torch.manual_seed(0)
    teacher = nn.Sequential(*[MLPBlock(nn.Linear) for _ in range(BLOCKS)]).requires_grad_(False)
    dense = nn.Sequential(*[MLPBlock(nn.Linear) for _ in range(BLOCKS)])
    print("Pixelfly layers:")
    pixelfly = nn.Sequential(*[MLPBlock(pixelfly_linear) for _ in range(BLOCKS)])
    print(pixelfly[0].fc1)
    dense_loss, dense_time = train(dense, teacher, "dense")
    fly_loss, fly_time = train(pixelfly, teacher, "pixelfly")
    dense_w, fly_w = matrix_params(dense), matrix_params(pixelfly)
    print(f"\nfinal loss: dense {dense_loss:.4f}, pixelfly {fly_loss:.4f}")
    print(f"matrix weights (= multiply-adds per token): dense {dense_w:,}, pixelfly {fly_w:,} "
          f"({fly_w / dense_w:.1%}); FLOPs per token saved: {2 * (dense_w - fly_w):,}")
    print(f"CPU time: dense {dense_time:.1f}s, pixelfly {fly_time:.1f}s (speed is measured on the GPU: see BENCHMARKS.md)")


if __name__ == "__main__":
    main()
