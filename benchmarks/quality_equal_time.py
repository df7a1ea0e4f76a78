"""Dense vs Pixelfly GPT-2 trained by the recipe for the same wall-clock time: validation loss vs time and tokens.

    python benchmarks/quality_equal_time.py --minutes 4 --out $OUT/eqtime \\
        --train_file corpus/train.txt --validation_file corpus/validation.txt       # GPU, ~2 x (4 min + setup)
    (corpus/: `python research/make_corpus.py --out corpus`, or any text files)
    python benchmarks/quality_equal_time.py --report-only --out DIR                  # re-plot two finished runs
    python benchmarks/quality_equal_time.py --dry-run --out eqtime-dry              # CPU smoke test, tiny model

Each side is one `accelerate launch recipes/gpt2_wikitext.py` (bf16, torch.compile through accelerate's
--dynamo_backend, fused AdamW, constant learning rate after warmup so that stopping early is fair to both), with
--max_train_minutes as the stop. The recipe logs the validation loss with the training seconds and tokens seen
(train_log.jsonl), from which this script writes:
  DIR/<side>_log.jsonl   the two logs;   DIR/loss.png   loss vs time and vs tokens;
  DIR/summary.json       time to reach the loss both sides reach, and loss at equal tokens.
Training seconds include compilation and Triton autotuning on the first steps; run once before (same machine)
to fill the caches when the comparison should be about steady-state speed.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "gpt2_wikitext.py"
SIDES = {"dense": ["--dense"], "pixelfly": []}


def run_side(name, args, extra):
    out = Path(args.out) / name
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
              "--dynamo_backend", "no" if args.dry_run else "inductor"]
    launch += ["--cpu", "--mixed_precision", "no"] if args.dry_run else ["--mixed_precision", "bf16"]
    cmd = [*launch, str(RECIPE), "--model_size", args.model_size, "--max_train_minutes", str(args.minutes),
           "--max_train_steps", "1000000", "--lr_scheduler_type", "constant_with_warmup",
           "--num_warmup_steps", str(args.warmup), "--eval_steps", str(args.eval_steps),
           "--logging_steps", str(min(10, args.eval_steps)), "--output_dir", str(out), *SIDES[name], *extra]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    shutil.copy(out / "train_log.jsonl", Path(args.out) / f"{name}_log.jsonl")


def read_curve(path):
    """(seconds, tokens, loss) arrays of the eval records, and the median training rate over the logging
    windows (steady state: compilation, autotuning and recompilation stalls are single outlier windows)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    evals = [r for r in rows if "eval/loss" in r]
    curve = {k: np.array([r[key] for r in evals]) for k, key in
             (("seconds", "train/seconds"), ("tokens", "train/tokens"), ("loss", "eval/loss"))}
    curve["steady_tokens_per_second"] = float(np.median([r["train/tokens_per_second"] for r in rows
                                                         if "train/tokens_per_second" in r]))
    return curve


def first_crossing(x, loss, target):
    """Smallest x at which the (linearly interpolated) loss curve reaches target, or None."""
    below = np.nonzero(loss <= target)[0]
    if len(below) == 0:
        return None
    i = below[0]
    if i == 0:
        return float(x[0])
    x0, x1, l0, l1 = x[i - 1], x[i], loss[i - 1], loss[i]
    return float(x0 + (x1 - x0) * (l0 - target) / (l0 - l1))


def summarize(curves):
    dense, pix = curves["dense"], curves["pixelfly"]
    # the loss both runs reach: the worse of the two final losses
    target = float(max(dense["loss"][-1], pix["loss"][-1]))
    t_dense, t_pix = first_crossing(dense["seconds"], dense["loss"], target), first_crossing(
        pix["seconds"], pix["loss"], target)
    tok_dense, tok_pix = first_crossing(dense["tokens"], dense["loss"], target), first_crossing(
        pix["tokens"], pix["loss"], target)
    steady_dense, steady_pix = (tok_dense / dense["steady_tokens_per_second"],
                                tok_pix / pix["steady_tokens_per_second"])
    common_tokens = float(min(dense["tokens"][-1], pix["tokens"][-1]))
    at_tokens = {k: float(np.interp(common_tokens, c["tokens"], c["loss"])) for k, c in curves.items()}
    return dict(
        final={k: dict(loss=float(c["loss"][-1]), seconds=float(c["seconds"][-1]), tokens=int(c["tokens"][-1]),
                       tokens_per_second=float(c["tokens"][-1] / c["seconds"][-1]),
                       steady_tokens_per_second=c["steady_tokens_per_second"]) for k, c in curves.items()},
        target_loss=target, seconds_to_target=dict(dense=t_dense, pixelfly=t_pix),
        time_to_target_ratio_dense_over_pixelfly=t_dense / t_pix if t_dense and t_pix else None,
        tokens_to_target=dict(dense=tok_dense, pixelfly=tok_pix),
        # time to target at the steady training rate: without the one-time costs the short runs carry
        steady_seconds_to_target=dict(dense=steady_dense, pixelfly=steady_pix),
        steady_time_to_target_ratio_dense_over_pixelfly=steady_dense / steady_pix,
        loss_at_equal_tokens=dict(tokens=common_tokens, **at_tokens,
                                  pixelfly_over_dense=at_tokens["pixelfly"] / at_tokens["dense"]),
    )


def plot(curves, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, c in curves.items():
        axes[0].plot(c["seconds"] / 60, c["loss"], marker=".", label=name)
        axes[1].plot(c["tokens"] / 1e6, c["loss"], marker=".", label=name)
    axes[0].set_xlabel("training minutes (compile + autotune included)")
    axes[1].set_xlabel("tokens seen (millions)")
    for ax in axes:
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
        ax.legend()
        # the first evaluation (random init, loss ~ ln(vocab)) would flatten the interesting part
        tail = np.concatenate([c["loss"][1:] for c in curves.values()])
        ax.set_ylim(tail.min() - 0.1, np.percentile(tail, 90) + 0.2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--minutes", type=float, default=4.0, help="training time per side")
    parser.add_argument("--model_size", default="small")
    parser.add_argument("--eval_steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=100, help="warmup steps of the constant schedule")
    parser.add_argument("--sides", nargs="+", default=list(SIDES), choices=list(SIDES))
    parser.add_argument("--report-only", action="store_true", help="only summarize/plot DIR/<side>_log.jsonl")
    parser.add_argument("--dry-run", action="store_true", help="tiny model on CPU, shipped text, seconds")
    args, extra = parser.parse_known_args(argv)  # everything else goes to the recipe
    if args.dry_run:
        data = ROOT / "recipes" / "data" / "shakespeare"
        args.model_size, args.minutes, args.eval_steps, args.warmup = "tiny", 0.15, 10, 5
        extra += ["--train_file", str(data / "train.txt"), "--validation_file", str(data / "validation.txt"),
                  "--max_eval_samples", "32", "--per_device_train_batch_size", "8", "--seq_len", "64"]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        for name in args.sides:
            run_side(name, args, extra)
    curves = {name: read_curve(Path(args.out) / f"{name}_log.jsonl") for name in SIDES}
    summary = summarize(curves)
    summary["command"] = " ".join(["python", "benchmarks/quality_equal_time.py", *(argv or sys.argv[1:])])
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=1))
    plot(curves, Path(args.out) / "loss.png", f"GPT-2 {args.model_size}: dense vs Pixelfly, equal training time")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
