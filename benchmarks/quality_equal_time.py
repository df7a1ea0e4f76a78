"""Dense, Pixelfly and Pixelfly-then-dense GPT-2 trained by the recipe for the same wall-clock time: validation loss
against time and tokens, and how soon each reaches the loss dense ends with.

    python benchmarks/quality_equal_time.py --minutes 4 --out $OUT/eqtime \\
        --train_file corpus/train.txt --validation_file corpus/validation.txt       # GPU, ~3 x (4 min + setup)
    (corpus/: `python research/make_corpus.py --out corpus`, or any text files)
    python benchmarks/quality_equal_time.py --report-only --out DIR                  # re-plot finished runs
    python benchmarks/quality_equal_time.py --dry-run --out eqtime-dry              # CPU smoke test, tiny model

Each arm is one `accelerate launch recipes/gpt2_wikitext.py` (bf16, the recipe's default compilation: on a GPU
torch.compile with CUDA graphs; fused AdamW; constant learning rate after warmup so that stopping early is fair), with
--max_train_minutes as the stop. Pixelfly-then-dense trains Pixelfly for --densify_at of the time, then merges
(merge_and_unload) and trains the dense model for the rest; the merge and the recompilation count as its time.
The recipe logs the validation loss with the training seconds and tokens seen (train_log.jsonl), from which
this script writes:
  DIR/<arm>_log.jsonl   the logs;   DIR/loss.png   loss vs time and vs tokens;
  DIR/summary.json      per arm: time and tokens to dense's final loss, measured and at the steady rate, and
                        the loss at equal tokens.
Training seconds include compilation and Triton autotuning on the first steps; run once before (same machine)
to fill the caches when the comparison should be about steady-state speed.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np

from recipe_runs import ROOT, launch_recipe, read_log  # benchmarks/recipe_runs.py
ARMS = ("dense", "pixelfly", "pixelfly-then-dense")


def arm_flags(name, args):
    return {"dense": ["--dense"], "pixelfly": [], "pixelfly-then-dense": ["--densify_at", str(args.densify_at)]}[name]


def run_arm(name, args, extra):
    out = Path(args.out) / name
    launch_recipe("gpt2_wikitext.py", out, [
        "--model_size", args.model_size, "--max_train_minutes", str(args.minutes), "--max_train_steps", "1000000",
        "--lr_scheduler_type", "constant_with_warmup", "--num_warmup_steps", str(args.warmup),
        "--eval_steps", str(args.eval_steps), "--logging_steps", str(min(10, args.eval_steps)),
        *arm_flags(name, args), *extra], cpu=args.dry_run)
    shutil.copy(out / "train_log.jsonl", Path(args.out) / f"{name}_log.jsonl")
    shutil.copy(out / "all_results.json", Path(args.out) / f"{name}_results.json")


def read_curve(out, name):
    """(seconds, tokens, loss) arrays of an arm's eval records, and its steady training rate: the median over the
    logging windows (compilation, autotuning and recompilation stalls are single outlier windows), one per phase
    (before and after the switch to dense)."""
    rows = read_log(out / f"{name}_log.jsonl")
    results_file = out / f"{name}_results.json"
    switch = json.loads(results_file.read_text()).get("densified_at_step") if results_file.is_file() else None
    evals = [r for r in rows if "eval/loss" in r]
    curve = {k: np.array([r[key] for r in evals]) for k, key in
             (("seconds", "train/seconds"), ("tokens", "train/tokens"), ("loss", "eval/loss"))}
    windows = [r for r in rows if "train/tokens_per_second" in r]
    tokens_per_step = curve["tokens"][-1] / max(r["step"] for r in rows)
    phases = [w for w in ([r for r in windows if switch is None or r["step"] <= switch],
                          [r for r in windows if switch is not None and r["step"] > switch]) if w]
    # (tokens at which the phase starts, its median rate)
    curve["phases"] = [(0.0 if i == 0 else switch * tokens_per_step,
                        float(np.median([r["train/tokens_per_second"] for r in w]))) for i, w in enumerate(phases)]
    curve["densified_at_step"] = switch
    return curve


def steady_seconds(curve, tokens):
    """Seconds to see `tokens` at the arm's steady rate in each phase: the time without the one-time costs."""
    seconds = 0.0
    for i, (begin, rate) in enumerate(curve["phases"]):
        end = curve["phases"][i + 1][0] if i + 1 < len(curve["phases"]) else math.inf
        seconds += max(0.0, min(tokens, end) - begin) / rate
    return seconds


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
    """Every arm against dense's final validation loss (the quality dense reaches in the budget)."""
    dense = curves["dense"]
    target = float(dense["loss"][-1])
    common_tokens = float(min(c["tokens"][-1] for c in curves.values()))
    summary = dict(target_loss=target, loss_at_equal_tokens=dict(tokens=common_tokens), arms={})
    t_dense, tok_dense = float(dense["seconds"][-1]), float(first_crossing(dense["tokens"], dense["loss"], target))
    steady_dense = steady_seconds(dense, tok_dense)
    for name, c in curves.items():
        seconds, tokens = first_crossing(c["seconds"], c["loss"], target), first_crossing(c["tokens"], c["loss"], target)
        steady = steady_seconds(c, tokens) if tokens is not None else None
        summary["loss_at_equal_tokens"][name] = float(np.interp(common_tokens, c["tokens"], c["loss"]))
        summary["arms"][name] = dict(
            final_loss=float(c["loss"][-1]), seconds=float(c["seconds"][-1]), tokens=int(c["tokens"][-1]),
            tokens_per_second=float(c["tokens"][-1] / c["seconds"][-1]),
            steady_tokens_per_second=[rate for _, rate in c["phases"]], densified_at_step=c["densified_at_step"],
            # None: the arm did not reach dense's final loss within the budget
            seconds_to_target=seconds, tokens_to_target=tokens, steady_seconds_to_target=steady,
            time_to_target_speedup=t_dense / seconds if seconds else None,
            steady_time_to_target_speedup=steady_dense / steady if steady else None,
            tokens_to_target_over_dense=tokens / tok_dense if tokens is not None else None,
        )
    return summary


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
    parser.add_argument("--minutes", type=float, default=4.0, help="training time per arm")
    parser.add_argument("--model_size", default="small")
    parser.add_argument("--eval_steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=100, help="warmup steps of the constant schedule")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--densify_at", type=float, default=0.75,
                        help="pixelfly-then-dense: the fraction of the time trained as Pixelfly")
    parser.add_argument("--report-only", action="store_true", help="only summarize/plot DIR/<arm>_log.jsonl")
    parser.add_argument("--dry-run", action="store_true", help="tiny model on CPU, shipped text, seconds")
    args, extra = parser.parse_known_args(argv)  # everything else goes to the recipe
    if args.dry_run:
        data = ROOT / "recipes" / "data" / "shakespeare"
        args.model_size, args.minutes, args.eval_steps, args.warmup = "tiny", 0.2, 2, 2
        extra += ["--train_file", str(data / "train.txt"), "--validation_file", str(data / "validation.txt"),
                  "--max_eval_samples", "32", "--per_device_train_batch_size", "8", "--seq_len", "64"]
    if "dense" not in args.arms:
        parser.error("--arms must include dense: every arm is measured against dense's final loss")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        for name in args.arms:
            run_arm(name, args, extra)
    curves = {name: read_curve(out, name) for name in args.arms if (out / f"{name}_log.jsonl").is_file()}
    summary = summarize(curves)
    summary["command"] = " ".join(["python", "benchmarks/quality_equal_time.py", *(argv or sys.argv[1:])])
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    plot(curves, out / "loss.png", f"GPT-2 {args.model_size}: dense, Pixelfly, Pixelfly then dense; equal training time")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
