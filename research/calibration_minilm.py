"""Question: how close to the dense MiniLM-L6 does get_model(..., calibration_data=...) land, on passages it was not
calibrated on? The fine-tune study (benchmarks/finetune_recovery.py) starts from this model; its final hidden state
is what the classifier head reads.

Calibration: the first --calibration_batches batches of 32 passages of the shipped prose-source training file (128
tokens, as recipes/bert_glue.py feeds them); held out: the first --heldout_batches batches of its validation file.
Reports ||H - H_dense|| / ||H_dense|| of the last hidden state over the non-padding held-out tokens, the mean CLS
cosine, and the mean per-matrix projection error, for the weight fit and the calibrated fit.

Run: python research/calibration_minilm.py --density 0.5 --calibration_batches 8   (2-core CPU: a few minutes)
"""
from __future__ import annotations

import argparse
import copy
import csv
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, BertModel

from pixelfly_hf import PixelflyConfig, get_model
from projection_minilm import model_dir  # research/projection_minilm.py

DATA = Path(__file__).resolve().parents[1] / "recipes" / "data" / "prose_source"


def passages(split: str, tokenizer, n_batches: int, batch_size: int = 32) -> list[dict]:
    with open(DATA / f"{split}.csv", newline="") as f:
        texts = [row["sentence"] for row in csv.DictReader(f)]
    return [dict(tokenizer(texts[i:i + batch_size], truncation=True, max_length=128, padding=True, return_tensors="pt"))
            for i in range(0, n_batches * batch_size, batch_size)]


@torch.no_grad()
def hidden_error(model, dense_hidden: list[torch.Tensor], heldout: list[dict]) -> tuple[float, float]:
    """(relative error of the last hidden state over non-padding tokens, mean CLS cosine) against the dense model."""
    num = den = cosine = count = 0.0
    for batch, reference in zip(heldout, dense_hidden):
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].bool()
        num += (hidden - reference)[mask].pow(2).sum().item()
        den += reference[mask].pow(2).sum().item()
        cosine += torch.cosine_similarity(hidden[:, 0], reference[:, 0], dim=-1).sum().item()
        count += hidden.shape[0]
    return (num / den) ** 0.5, cosine / count


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--density", type=float, default=0.5)
    parser.add_argument("--calibration_batches", type=int, default=8)
    parser.add_argument("--heldout_batches", type=int, default=4)
    parser.add_argument("--skip_weight_fit", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir())
    dense = BertModel.from_pretrained(model_dir()).eval()
    calibration = passages("train", tokenizer, args.calibration_batches)
    heldout = passages("validation", tokenizer, args.heldout_batches)
    with torch.no_grad():
        dense_hidden = [dense(**batch).last_hidden_state for batch in heldout]
    config = PixelflyConfig(density=args.density, block_size=32)
    arms = {} if args.skip_weight_fit else {"weight fit": None}
    arms[f"calibrated ({args.calibration_batches} batches)"] = calibration
    for name, data in arms.items():
        start = time.perf_counter()
        model = get_model(copy.deepcopy(dense), config, calibration_data=data).eval()
        seconds = time.perf_counter() - start
        errors = [row["projection_error"] for row in model.sparsity_summary()["layers"]]
        error, cosine = hidden_error(model, dense_hidden, heldout)
        print(f"density {args.density:g}, {name}: held-out final hidden rel. error {error:.3f}, CLS cosine "
              f"{cosine:.3f}; matrix error {sum(errors) / len(errors):.3f} mean; get_model {seconds:.0f} s", flush=True)


if __name__ == "__main__":
    main()
