"""End to end: GPT-2 training steps, dense HF GPT-2 (SDPA) vs Pixelfly GPT-2, eager and torch.compile, one GPU.

    python benchmarks/bench_e2e.py --json e2e.json --md e2e.md          # small + medium, ~5 min on one H200
    python benchmarks/bench_e2e.py --dry-run                            # tiny GPT-2 on CPU, checks the script

For each model (small 16x1024 tokens, medium 8x1024 by default), variant (dense / Pixelfly) and mode (eager /
compile / cudagraphs): tokens/s (batch * seq / median step time), median step time, peak GPU memory (max_memory_allocated,
reset per config), warmup time (the first step carries torch.compile and Triton autotuning; excluded from the
timing), and with --profile a per-step breakdown of GPU kernel time from torch.profiler (sparse matmuls = our
Triton kernels; dense matmuls = cuBLAS/CUTLASS incl. the LM head and the Pixelfly low-rank GEMMs; attention;
elementwise/norms; loss; optimizer incl. grad clipping; other) and the host gap (step time minus summed kernel
time: large means the GPU waits on Python), with the host ops that take the most self CPU time per step.

What is shared with the recipe (recipes/gpt2_wikitext.py): its flags and defaults (model presets, dropout,
density, low rank, Pixelfly block size, target modules, lr, betas, weight decay, grad clip, schedule) through
its own `parse_args`, the Pixelfly wiring (`common.apply_pixelfly`, random init as for from-scratch training)
and the optimizer (`common.make_optimizer`: AdamW, fused on GPU, no decay on biases/norms). The step itself lives inside accelerate's loop
(`common.fit`), so it is replicated minimally: bf16 autocast on the forward (what `accelerate launch
--mixed_precision bf16` does, fp32 weights), backward, clip_grad_norm_, optimizer step, lr schedule step,
zero_grad. Inputs are random tokens with labels = inputs
and an all-ones attention mask, as the recipe's collator gives (`--no-attention-mask` drops it).
`--vocab-multiple 64` pads both variants' vocabulary (50257 -> 50304, as nanoGPT does) so the LM head's GEMMs get
aligned tensor-core kernels (session 7: the unpadded head's align-1 cuBLAS kernels took 28% of dense GPT-2 small's
eager step); the inputs stay within the tokenizer's ids.
"""
import argparse
import contextlib
import gc
import importlib
import io
import json
import math
import platform
import statistics
import sys
import time
import traceback
import types
from collections import defaultdict
from pathlib import Path

import torch
import transformers
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, get_scheduler

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
DEFAULT_BATCH = {"tiny": 2, "small": 16, "medium": 8}
VARIANTS = ("dense", "pixelfly")
# cudagraphs = torch.compile(mode="reduce-overhead"): the compiled graphs replayed as CUDA graphs (no host launches)
MODES = ("eager", "compile", "cudagraphs")
CATEGORIES = ("sparse matmul", "dense matmul", "attention", "elementwise/norm", "loss", "optimizer", "other")
# Kernel/op name substrings (lower case). Scope categories are matched first, over the op and its CPU parents
# (on CUDA only the kernel's own name is known); attention comes before dense because fmha kernels are CUTLASS.
SCOPE_PATTERNS = (
    ("sparse matmul", ("butterfly",)),
    ("optimizer", ("optimizer", "adam", "multi_tensor", "foreach", "clip_grad")),
    ("loss", ("cross_entropy", "nll_loss", "nllloss", "log_softmax", "logsoftmax")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "scaled_dot_product", "cudnn")),
)
OWN_PATTERNS = (
    ("dense matmul", ("gemm", "cutlass", "cublas", "nvjet", "xmma", "splitk", "triton_tem", "aten::mm",
                      "addmm", "bmm", "matmul", "aten::linear", "mmbackward")),
    ("elementwise/norm", ("elementwise", "vectorized", "unrolled", "triton_", "norm", "reduce", "dropout", "gelu",
                          "tanh", "bernoulli", "pow", "add", "mul", "div", "copy", "fill", "cat", "index", "embedding",
                          "softmax", "where", "sum", "native_")),
)


def import_recipe():
    """recipes/gpt2_wikitext.py as a module. It imports `datasets` at the top, which the GPU machines lack; the
    benchmark uses only its flags, so a stand-in is put in place for the import when `datasets` is missing."""
    sys.path.insert(0, str(RECIPES))
    try:
        import datasets  # noqa: F401
    except ImportError:
        def load_dataset(*_args, **_kwargs):
            raise RuntimeError("`datasets` is not installed: bench_e2e.py only reads the recipe's flags")

        sys.modules["datasets"] = types.SimpleNamespace(load_dataset=load_dataset)
        try:
            return importlib.import_module("gpt2_wikitext")
        finally:
            del sys.modules["datasets"]
    return importlib.import_module("gpt2_wikitext")


def parse_args(recipe, argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", choices=sorted(recipe.MODEL_SIZES), default=None,
                   help="GPT-2 presets of the recipe (default: small medium; tiny with --dry-run)")
    p.add_argument("--batch", type=int, default=None,
                   help=f"sequences per step for every model (default per model: {DEFAULT_BATCH})")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence (default: the recipe preset's, 1024 for small/medium; 128 with --dry-run)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per config (default 20; 2 with --dry-run)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps first, compile + autotune included (default 5; 1 with --dry-run)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=None,
                   help="eager, compile (torch.compile of the whole model), cudagraphs (compile with "
                        "mode='reduce-overhead'); default eager and compile, eager with --dry-run")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--density", type=float, default=None,
                   help="Pixelfly budget per matrix (default: the recipe's --density default)")
    p.add_argument("--attention-mask", action=argparse.BooleanOptionalAction, default=True,
                   help="pass the all-ones attention mask the recipe's collator gives")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                   help="per-step time breakdown from torch.profiler")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=300.0,
                   help="start no new config after this many seconds; the rest are marked skipped")
    p.add_argument("--vocab-multiple", type=int, default=1,
                   help="pad the vocabulary of both variants to a multiple of this (64: 50257 -> 50304)")
    p.add_argument("--json", type=Path, default=None, help="write all numbers here")
    p.add_argument("--md", type=Path, default=None, help="write the Markdown tables here")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny GPT-2 (2 layers, 128 wide, seq 128, batch 2) on CPU, reference backend, 2 steps")
    args = p.parse_args(argv)
    dry = args.dry_run
    args.models = args.models or (["tiny"] if dry else ["small", "medium"])
    args.seq_len = args.seq_len or (128 if dry else None)
    args.steps = args.steps if args.steps is not None else (2 if dry else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if dry else 5)
    args.modes = args.modes or (["eager"] if dry else ["eager", "compile"])
    for flag in ("steps", "profile_steps", "vocab_multiple"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be >= 1")
    if args.warmup < 1:
        p.error(f"--warmup {args.warmup} must be >= 1 (the first step compiles and autotunes; it is never timed)")
    if args.seq_len is not None and not 2 <= args.seq_len <= 1024:
        p.error(f"--seq-len {args.seq_len} does not fit GPT-2's 1024 positions: give 2 to 1024")
    if args.batch is not None and args.batch < 1:
        p.error(f"--batch {args.batch} must be >= 1")
    missing = [m for m in args.models if args.batch is None and m not in DEFAULT_BATCH]
    if missing:
        p.error(f"no default batch for --models {' '.join(missing)}: pass --batch N")
    if dry:
        args.device = torch.device("cpu")
    elif torch.cuda.is_available():
        args.device = torch.device("cuda")
    else:
        p.error("no CUDA device here: run on a GPU, or pass --dry-run to check the script on CPU")
    return args


def recipe_args(recipe, model_size, variant, density, seq_len):
    """The recipe's own parsed flags for this run (its defaults and validation)."""
    argv = ["--model_size", model_size] + (["--seq_len", str(seq_len)] if seq_len else [])
    if variant == "dense":
        argv.append("--dense")
    elif density is not None:
        argv += ["--density", repr(density)]
    try:
        return recipe.parse_args(argv)
    except recipe.common.RecipeError as error:
        raise SystemExit(f"error: {error}") from None


def seq_len_of(recipe, args, model_size):
    """--seq-len, else the recipe preset's (as the recipe: its --seq_len, else the preset's)."""
    return args.seq_len or recipe.MODEL_SIZES[model_size]["seq_len"]


def build(recipe, rargs, vocab_size, tokenizer, device):
    """The recipe's from-scratch GPT-2 (same GPT2Config as its main()), Pixelfly applied as the recipe does."""
    preset = recipe.MODEL_SIZES[rargs.model_size]
    config = GPT2Config(vocab_size=vocab_size, n_positions=1024, n_layer=preset["n_layer"], n_embd=preset["n_embd"],
                        n_head=preset["n_head"], resid_pdrop=rargs.dropout, embd_pdrop=rargs.dropout,
                        attn_pdrop=rargs.dropout, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.loss_type = "ForCausalLM"  # as the recipe does: no per-forward warning, no graph break there
    main_process = types.SimpleNamespace(is_main_process=True)
    with contextlib.redirect_stdout(io.StringIO()):  # the per-matrix table goes to the JSON, not the console
        model, sparsity = recipe.common.apply_pixelfly(model, rargs, main_process, pretrained=False)
    return model.to(device), sparsity


class StepTimer:
    """Per-step times: CUDA events (the host may run ahead, as in training) or perf_counter on CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.marks = []

    def mark(self):
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def step_ms(self):
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in zip(self.marks, self.marks[1:])]
        return [(b - a) * 1e3 for a, b in zip(self.marks, self.marks[1:])]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def classify(chain):
    """Category of an op or kernel from its name and (CPU only) the names of its parent ops."""
    lowered = [name.lower() for name in chain]
    for category, patterns in SCOPE_PATTERNS:
        if any(p in name for name in lowered for p in patterns):
            return category
    for category, patterns in OWN_PATTERNS:
        if any(p in lowered[0] for p in patterns):
            return category
    return "other"


def breakdown(prof, device, n_steps, step_ms):
    """Per-step time per category, the top kernels, the host gap (step time minus device-busy time) and, on
    GPU, the host ops with the most self CPU time (what the host spends a step on when the gap is large)."""
    per_category, per_name, host = defaultdict(float), defaultdict(float), defaultdict(float)
    for event in prof.events():
        if device.type == "cuda":
            if event.device_type == DeviceType.CPU and not event.is_async:
                host[event.name] += event.self_cpu_time_total
            if event.device_type != DeviceType.CUDA:
                continue
            us, chain = event.time_range.elapsed_us(), [event.name]
        else:
            if event.device_type != DeviceType.CPU or event.is_async:
                continue
            us, chain, parent = event.self_cpu_time_total, [event.name], event.cpu_parent
            while parent is not None:
                chain.append(parent.name)
                parent = parent.cpu_parent
        per_category[classify(chain)] += us
        per_name[event.name] += us
    busy_ms = sum(per_category.values()) / 1e3 / n_steps
    ms = {c: per_category[c] / 1e3 / n_steps for c in CATEGORIES}
    top = sorted(per_name.items(), key=lambda kv: -kv[1])[:10]
    return {
        "busy_ms_per_step": busy_ms,
        "busy_source": "CUDA kernels" if device.type == "cuda" else "CPU ops' self time",
        "host_gap_ms_per_step": step_ms - busy_ms,
        "category_ms_per_step": ms,
        "category_pct": {c: 100 * v / busy_ms if busy_ms else 0.0 for c, v in ms.items()},
        "top_kernels": [{"name": n, "ms_per_step": us / 1e3 / n_steps, "category": classify([n]),
                         "pct": 100 * us / 1e3 / n_steps / busy_ms if busy_ms else 0.0} for n, us in top],
        "top_host_ops": [{"name": n, "self_cpu_ms_per_step": us / 1e3 / n_steps}
                         for n, us in sorted(host.items(), key=lambda kv: -kv[1])[:15]],
    }


def run_config(recipe, args, model_size, variant, mode, vocab_size, tokenizer):
    device = args.device
    rargs = recipe_args(recipe, model_size, variant, args.density, args.seq_len)
    seq = seq_len_of(recipe, args, model_size)
    batch = args.batch or DEFAULT_BATCH[model_size]
    row = {"model": model_size, "variant": variant, "mode": mode, "batch": batch, "seq_len": seq, "vocab_size": vocab_size}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(rargs.seed)
    model, sparsity = build(recipe, rargs, vocab_size, tokenizer, device)
    row["params"] = sum(p.numel() for p in model.parameters())
    if sparsity is not None:
        row["pixelfly"] = {"density": sparsity["density"], "low_rank": rargs.low_rank,
                           "block_size": rargs.pixelfly_block_size, "target_modules": rargs.target_modules,
                           "replaced_matrices": sparsity["replaced_matrices"], "layers": sparsity["layers"]}
    model.train()
    optimizer = recipe.common.make_optimizer(model, rargs, args.device)
    total_steps = args.warmup + args.steps + (args.profile_steps if args.profile else 0)
    scheduler = get_scheduler(rargs.lr_scheduler_type, optimizer=optimizer, num_warmup_steps=rargs.num_warmup_steps,
                              num_training_steps=total_steps)
    forward = model if mode == "eager" else torch.compile(model, mode="reduce-overhead" if mode == "cudagraphs" else None)
    input_ids = torch.randint(0, len(tokenizer), (batch, seq), device=device)  # padded ids never occur
    inputs = {"input_ids": input_ids, "labels": input_ids}
    if args.attention_mask:
        inputs["attention_mask"] = torch.ones_like(input_ids)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = forward(**inputs).loss
        loss.backward()
        loss = loss.detach()
        if rargs.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), rargs.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        return loss

    torch._dynamo.utils.counters.clear()
    tick = time.perf_counter()
    loss = step()
    sync(device)
    row["first_step_s"] = time.perf_counter() - tick
    for _ in range(args.warmup - 1):
        loss = step()
    sync(device)
    row["warmup_s"] = time.perf_counter() - tick
    if mode != "eager":
        counters = torch._dynamo.utils.counters
        row["graph_breaks"] = sum(counters["graph_break"].values())
        row["graph_break_reasons"] = [str(reason)[:300] for reason in list(counters["graph_break"])[:5]]
        row["unique_graphs"] = counters["stats"]["unique_graphs"]

    timer = StepTimer(device)
    tick = time.perf_counter()
    timer.mark()
    for _ in range(args.steps):
        loss = step()
        timer.mark()
    times = timer.step_ms()
    wall = time.perf_counter() - tick
    median = statistics.median(times)
    row.update(status="ok", step_ms=median, step_ms_mean=wall * 1e3 / args.steps, step_ms_min=min(times),
               step_ms_max=max(times), tokens_per_s=batch * seq / (median / 1e3), final_loss=loss.item())
    if not math.isfinite(row["final_loss"]):
        row["warning"] = f"loss is {row['final_loss']}: the numbers time a diverged run"
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30

    if args.profile:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        sync(device)
        tick = time.perf_counter()
        with profile(activities=activities) as prof:
            for _ in range(args.profile_steps):
                step()
            sync(device)
        row["profiled_step_ms"] = (time.perf_counter() - tick) * 1e3 / args.profile_steps
        row["breakdown"] = breakdown(prof, device, args.profile_steps, median)
        if not row["breakdown"]["busy_ms_per_step"]:
            row["warning"] = "the profiler recorded no device time: the breakdown is empty"
    return row


def release(device):
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fmt(value, spec):
    return "–" if value is None else format(value, spec)


def summary_table(rows):
    best = {}
    for r in rows:
        if r["variant"] == "dense" and r.get("status") == "ok":
            best[r["model"]] = max(best.get(r["model"], 0.0), r["tokens_per_s"])
    lines = ["| model | variant | mode | batch x seq | tokens/s | step ms | peak GiB | speedup vs best dense | "
             "warmup s | note |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ok = r.get("status") == "ok"
        speed = r["tokens_per_s"] / best[r["model"]] if ok and r["model"] in best else None
        variant = r["variant"]
        if "pixelfly" in r:
            variant += f" ({r['pixelfly']['density']:.1%})"
        note = r.get("error") or r.get("warning") or ""
        if r.get("status") == "skipped":
            note = "skipped: over --budget-s"
        if r.get("graph_breaks"):
            note = (note + f"; {r['graph_breaks']} graph breaks").lstrip("; ")
        lines.append(
            f"| gpt2-{r['model']} | {variant} | {r['mode']} | {r['batch']}x{r['seq_len']} | "
            f"{fmt(r.get('tokens_per_s'), ',.0f')} | {fmt(r.get('step_ms'), '.1f')} | {fmt(r.get('peak_gib'), '.1f')} | "
            f"{fmt(speed, '.2f')} | {fmt(r.get('warmup_s'), '.1f')} | {note.replace('|', '/')} |")
    return "\n".join(lines)


def breakdown_tables(rows):
    profiled = [r for r in rows if "breakdown" in r]
    if not profiled:
        return ""
    source = profiled[0]["breakdown"]["busy_source"]
    lines = [f"Per-step time by category, % of busy time ({source}); host gap = step time - busy time.", "",
             "| model | variant | mode | step ms | busy ms | host gap ms | " + " | ".join(CATEGORIES) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(CATEGORIES)]
    for r in profiled:
        b = r["breakdown"]
        lines.append(f"| gpt2-{r['model']} | {r['variant']} | {r['mode']} | {r['step_ms']:.1f} | "
                     f"{b['busy_ms_per_step']:.1f} | {b['host_gap_ms_per_step']:.1f} | "
                     + " | ".join(f"{b['category_pct'][c]:.1f}" for c in CATEGORIES) + " |")
    for r in profiled:
        what = "kernels" if r["breakdown"]["busy_source"] == "CUDA kernels" else "ops"
        lines += ["", f"Top {what}, gpt2-{r['model']} {r['variant']} {r['mode']}:", "",
                  "| ms/step | % | category | name |", "|---|---|---|---|"]
        lines += [f"| {k['ms_per_step']:.2f} | {k['pct']:.1f} | {k['category']} | `{k['name'][:110]}` |"
                  for k in r["breakdown"]["top_kernels"]]
        if r["breakdown"]["top_host_ops"]:
            lines += ["", f"Host ops by self CPU time, gpt2-{r['model']} {r['variant']} {r['mode']}:", "",
                      "| self CPU ms/step | op |", "|---|---|"]
            lines += [f"| {k['self_cpu_ms_per_step']:.2f} | `{k['name'][:110]}` |" for k in r["breakdown"]["top_host_ops"]]
    return "\n".join(lines)


def environment(device):
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def main(argv=None):
    start = time.perf_counter()
    recipe = import_recipe()
    args = parse_args(recipe, argv)
    tokenizer = AutoTokenizer.from_pretrained(recipe.SHIPPED_TOKENIZER)
    vocab_size = math.ceil(len(tokenizer) / args.vocab_multiple) * args.vocab_multiple
    defaults = recipe_args(recipe, args.models[0], "pixelfly", args.density, args.seq_len)
    print(f"{environment(args.device)}\nPixelfly: density {defaults.density}, low rank {defaults.low_rank}, "
          f"targets {defaults.target_modules}; recipe's AdamW, attention mask "
          f"{'ones' if args.attention_mask else 'none'}; budget {args.budget_s:.0f} s", flush=True)

    rows = []
    for model_size in args.models:
        for mode in args.modes:
            for variant in args.variants:
                elapsed = time.perf_counter() - start
                head = {"model": model_size, "variant": variant, "mode": mode,
                        "batch": args.batch or DEFAULT_BATCH[model_size],
                        "seq_len": seq_len_of(recipe, args, model_size)}
                if elapsed > args.budget_s:
                    rows.append({**head, "status": "skipped"})
                    print(f"[{elapsed:5.0f}s] gpt2-{model_size} {variant} {mode}: skipped (over --budget-s)")
                    continue
                print(f"[{elapsed:5.0f}s] gpt2-{model_size} {variant} {mode} ...", flush=True)
                try:
                    row = run_config(recipe, args, model_size, variant, mode, vocab_size, tokenizer)
                    print(f"        {row['tokens_per_s']:,.0f} tokens/s, {row['step_ms']:.1f} ms/step, "
                          f"warmup {row['warmup_s']:.1f} s", flush=True)
                except Exception as error:  # a failed compile or OOM must not stop the other configs
                    traceback.print_exc()
                    text = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
                    row = {**head, "status": "error", "error": text[:400]}
                    print(f"        failed: {row['error']}", flush=True)
                rows.append(row)
                release(args.device)
                write_outputs(args, rows, defaults, start)  # after every config, so a killed run keeps its rows

    title, table, details = write_outputs(args, rows, defaults, start)
    if details:
        print("\n" + details)
    print(f"\n{title}\n\n{table}")


def write_outputs(args, rows, defaults, start):
    """Write --json / --md with the rows so far; return the title and the two tables."""
    details = breakdown_tables(rows)
    table = summary_table(rows)
    total = time.perf_counter() - start
    title = (f"GPT-2 training step, {environment(args.device)['device']}, bf16 autocast, recipe's AdamW ({'fused' if args.device.type == 'cuda' else 'foreach'}), "
             f"{args.steps} timed steps after {args.warmup} warmup, medians; total {total:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"environment": environment(args.device), "total_s": total,
                "recipe_defaults": {"density": defaults.density, "low_rank": defaults.low_rank,
                                    "target_modules": defaults.target_modules, "dropout": defaults.dropout,
                                    "max_grad_norm": defaults.max_grad_norm, "weight_decay": defaults.weight_decay},
                "args": {k: (str(v) if isinstance(v, (Path, torch.device)) else v) for k, v in vars(args).items()}}
        args.json.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(f"{title}\n\n{table}\n\n{details}\n")
    return title, table, details


if __name__ == "__main__":
    main()
