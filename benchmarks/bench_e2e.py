"""End to end: training steps of HF GPT-2, BERT and ViT, dense against Pixelfly, in one process on one GPU.

    python benchmarks/bench_e2e.py --json e2e.json --md e2e.md --plot e2e.png   # every default row: base to large, long context
    python benchmarks/bench_e2e.py --rows gpt2-medium:8x1024 --modes cudagraphs # one row, one mode
    python benchmarks/bench_e2e.py --dry-run                                    # tiny models on CPU, checks the script

A row is MODEL:BATCHxSEQ (ViT: BATCHxIMAGE_SIDE). For each row, mode (eager; compile = torch.compile of the model;
cudagraphs = compile with mode="reduce-overhead") and variant (the same HF model dense, or through
`get_model(model, PixelflyConfig(density, low_rank, block_size, init="random"))`) it reports the median step time,
tokens (or images) per second, peak GPU memory, the warm-up (first steps: compile and autotuning), the loss at the
end of an equal number of steps on the same data, and with --profile a per-step breakdown of GPU kernel time
(sparse matmul = our Triton kernels; dense matmul = cuBLAS/CUTLASS, the LM head and the low-rank GEMMs included;
attention; elementwise/norm; loss; optimizer incl. grad clipping; other) and the host gap (step time minus
kernel time: large means the GPU waits on Python).

The step is the recipes' (pixelfly_hf.training's `TrainingLoop` under `accelerate launch --mixed_precision bf16`):
bf16 autocast on the forward with fp32 weights, backward, clip_grad_norm_(1.0), the recipes' AdamW (`make_optimizer`:
fused on GPU, no decay on biases and norms), a linear schedule, zero_grad. Data: GPT-2 and BERT read the shipped
Shakespeare text through the shipped GPT-2 tokenizer (BERT as masked LM, 15% of the positions masked, vocabulary + 1
for the mask token); ViT gets synthetic 10-class images (a fixed template per class plus noise), so its loss can
fall. Every variant sees the same batches in the same order. The vocabulary is padded to a multiple of --vocab-multiple
for both variants (64: 50257 -> 50304, as nanoGPT does) so the LM head's GEMMs get aligned tensor-core kernels.

Pixelfly attention: with --pixelfly-attention (default) the Pixelfly variant uses attention="pixelfly" on rows of at
least --sparse-attention-from tokens (default 2048, the library's own threshold below which it runs SDPA anyway).
"""
import argparse
import contextlib
import gc
import io
import json
import math
import platform
import statistics
import sys
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile
from transformers import (AutoTokenizer, BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, ViTConfig,
                          ViTForImageClassification, get_scheduler)

from pixelfly_hf.training import make_optimizer  # the recipes' optimizer, so both variants train as the recipes train

RECIPES = Path(__file__).resolve().parent.parent / "recipes"

VARIANTS = ("dense", "pixelfly")
MODES = ("eager", "compile", "cudagraphs")
CATEGORIES = ("sparse matmul", "dense matmul", "attention", "elementwise/norm", "loss", "optimizer", "other")
# Kernel/op name substrings (lower case). Scope categories are matched first, over the op and its CPU parents
# (on CUDA only the kernel's own name is known); attention comes before dense because fmha kernels are CUTLASS.
SCOPE_PATTERNS = (
    ("sparse matmul", ("butterfly",)),
    ("optimizer", ("optimizer", "adam", "multi_tensor", "foreach", "clip_grad")),
    ("loss", ("cross_entropy", "nll_loss", "nllloss", "log_softmax", "logsoftmax")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "scaled_dot_product", "cudnn", "attn_fwd", "attn_bwd")),
)
OWN_PATTERNS = (
    ("dense matmul", ("gemm", "cutlass", "cublas", "nvjet", "xmma", "splitk", "triton_tem", "aten::mm",
                      "addmm", "bmm", "matmul", "aten::linear", "mmbackward")),
    ("elementwise/norm", ("elementwise", "vectorized", "unrolled", "triton_", "norm", "reduce", "dropout", "gelu",
                          "tanh", "bernoulli", "pow", "add", "mul", "div", "copy", "fill", "cat", "index", "embedding",
                          "softmax", "where", "sum", "native_")),
)
TOKENIZER = RECIPES / "data" / "gpt2_tokenizer"
CORPUS = RECIPES / "data" / "shakespeare" / "train.txt"
VIT_CLASSES = 10
LOSS_WINDOW = 5  # the loss reported is the mean over the last this many steps


@dataclass(frozen=True)
class Model:
    """One benchmarked architecture: its HF config, the kernel's minimum tile for Pixelfly and its learning rate."""

    family: str  # "gpt2" | "bert" | "vit"
    config: dict
    block_size: int
    lr: float


MODELS = {
    "gpt2-tiny": Model("gpt2", dict(n_layer=2, n_embd=128, n_head=4), 16, 2e-3),
    "gpt2-small": Model("gpt2", dict(n_layer=12, n_embd=768, n_head=12), 32, 6e-4),
    "gpt2-medium": Model("gpt2", dict(n_layer=24, n_embd=1024, n_head=16), 32, 3e-4),
    "gpt2-large": Model("gpt2", dict(n_layer=36, n_embd=1280, n_head=20), 32, 2.5e-4),
    "bert-tiny": Model("bert", dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=512), 16, 1e-3),
    "bert-base": Model("bert", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                    intermediate_size=3072), 32, 1e-4),
    "bert-large": Model("bert", dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                     intermediate_size=4096), 32, 1e-4),
    "vit-tiny": Model("vit", dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
                                  patch_size=8), 16, 1e-3),
    "vit-base": Model("vit", dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                  intermediate_size=3072, patch_size=16), 32, 3e-4),
    "vit-large": Model("vit", dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                   intermediate_size=4096, patch_size=16), 32, 3e-4),
}
# the sizes people train, base to large, and long sequences where sparse attention pays (issue 30's targets)
DEFAULT_ROWS = ("gpt2-small:16x1024", "gpt2-medium:8x1024", "gpt2-large:8x1024", "bert-base:32x512",
                "bert-large:32x512", "vit-base:128x224", "vit-large:128x224", "gpt2-small:4x4096",
                "gpt2-medium:2x4096", "gpt2-small:2x8192", "gpt2-medium:1x8192")
DRY_ROWS = ("gpt2-tiny:2x128", "bert-tiny:2x64", "vit-tiny:2x32")


@dataclass(frozen=True)
class Row:
    model: str
    batch: int
    seq: int  # tokens per sequence; ViT: the image side in pixels

    @property
    def name(self):
        return f"{self.model}:{self.batch}x{self.seq}"

    @property
    def tokens(self):
        """Positions per step: tokens for text models, patches (+ the class token) for ViT."""
        if MODELS[self.model].family == "vit":
            return self.batch * ((self.seq // MODELS[self.model].config["patch_size"]) ** 2 + 1)
        return self.batch * self.seq


def parse_row(text):
    model, sep, shape = text.partition(":")
    batch, x, seq = shape.partition("x")
    if model not in MODELS or not sep or not x or not batch.isdigit() or not seq.isdigit():
        raise argparse.ArgumentTypeError(
            f"row {text!r}: give MODEL:BATCHxSEQ with MODEL one of {sorted(MODELS)}, e.g. gpt2-small:16x1024")
    row = Row(model, int(batch), int(seq))
    patch = MODELS[model].config.get("patch_size")
    if row.batch < 1 or row.seq < 2 or (patch and row.seq % patch):
        raise argparse.ArgumentTypeError(f"row {text!r}: batch >= 1 and seq >= 2 (ViT: a multiple of the patch {patch})")
    return row


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", type=parse_row, default=None,
                   help=f"MODEL:BATCHxSEQ rows (default: {' '.join(DEFAULT_ROWS)}; with --dry-run {' '.join(DRY_ROWS)})")
    p.add_argument("--modes", nargs="+", choices=MODES, default=None,
                   help="default: compile cudagraphs (eager with --dry-run)")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--steps", type=int, default=None, help="timed steps per config (default 15; 2 with --dry-run)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed steps first, compile + autotune included (default 5; 1 with --dry-run)")
    p.add_argument("--density", type=float, default=0.25, help="Pixelfly budget per matrix")
    p.add_argument("--low-rank", type=int, default=32, help="rank of the Pixelfly low-rank term")
    p.add_argument("--block-size", type=int, default=None, help="the kernel's minimum tile (default: per model)")
    p.add_argument("--target-modules", nargs="+", default=["attn", "mlp"])
    p.add_argument("--pixelfly-attention", action=argparse.BooleanOptionalAction, default=True,
                   help="Pixelfly attention on rows of at least --sparse-attention-from tokens")
    p.add_argument("--sparse-attention-from", type=int, default=2048)
    p.add_argument("--vocab-multiple", type=int, default=64,
                   help="pad the vocabulary of both variants to a multiple of this (1: GPT-2's 50257 as is)")
    p.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True,
                   help="per-step time breakdown from torch.profiler")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=540.0,
                   help="start no new config after this many seconds; the rest are marked skipped")
    p.add_argument("--json", type=Path, default=None, help="write all numbers here")
    p.add_argument("--md", type=Path, default=None, help="write the Markdown tables here")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG chart here (needs matplotlib)")
    p.add_argument("--dry-run", action="store_true", help="tiny models on CPU, reference backend, 2 steps")
    args = p.parse_args(argv)
    dry = args.dry_run
    args.rows = args.rows or [parse_row(r) for r in (DRY_ROWS if dry else DEFAULT_ROWS)]
    args.steps = args.steps if args.steps is not None else (2 if dry else 15)
    args.warmup = args.warmup if args.warmup is not None else (1 if dry else 5)
    args.modes = args.modes or (["eager"] if dry else ["compile", "cudagraphs"])
    for flag in ("steps", "warmup", "profile_steps", "vocab_multiple"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)} must be >= 1 (the first step compiles and "
                    "autotunes; it is never timed)")
    if dry:
        args.device = torch.device("cpu")
    elif torch.cuda.is_available():
        args.device = torch.device("cuda")
    else:
        p.error("no CUDA device here: run on a GPU, or pass --dry-run to check the script on CPU")
    return args


def build_model(row, vocab_size):
    spec = MODELS[row.model]
    if spec.family == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_positions=max(1024, row.seq), **spec.config)
        model = GPT2LMHeadModel(config)
    elif spec.family == "bert":
        config = BertConfig(vocab_size=vocab_size, max_position_embeddings=max(512, row.seq), **spec.config)
        model = BertForMaskedLM(config)
    else:
        config = ViTConfig(image_size=row.seq, num_labels=VIT_CLASSES, **spec.config)
        model = ViTForImageClassification(config)
    model.config._attn_implementation = "sdpa"
    if spec.family != "vit":
        model.loss_type = "ForCausalLM" if spec.family == "gpt2" else "ForMaskedLM"  # no per-forward warning
    return model


def apply_pixelfly(model, row, args):
    from pixelfly_hf import PixelflyConfig, get_model

    attention = "pixelfly" if args.pixelfly_attention and row.tokens // row.batch >= args.sparse_attention_from \
        else "dense"
    config = PixelflyConfig(density=args.density, low_rank=args.low_rank, target_modules=list(args.target_modules),
                            block_size=args.block_size or MODELS[row.model].block_size, attention=attention,
                            init="random")
    with contextlib.redirect_stdout(io.StringIO()):
        model = get_model(model, config)
    summary = model.sparsity_summary()
    return model, {"density": summary["density"], "low_rank": args.low_rank, "attention": attention,
                   "block_size": config.block_size, "replaced_matrices": summary["replaced_matrices"],
                   "layers": summary["layers"]}


def make_batches(row, vocab_size, tokenizer, n_batches, device):
    """n_batches input dicts for the row, the same for every variant (fixed seed)."""
    generator = torch.Generator().manual_seed(0)
    family = MODELS[row.model].family
    if family == "vit":
        templates = torch.randn(VIT_CLASSES, 3, 8, 8, generator=generator)
        templates = torch.nn.functional.interpolate(templates, size=(row.seq, row.seq), mode="bilinear")
        batches = []
        for _ in range(n_batches):
            labels = torch.randint(0, VIT_CLASSES, (row.batch,), generator=generator)
            pixels = templates[labels] + torch.randn(row.batch, 3, row.seq, row.seq, generator=generator)
            batches.append({"pixel_values": pixels, "labels": labels})
    else:
        ids = tokenizer(CORPUS.read_text(encoding="utf-8"), return_attention_mask=False)["input_ids"]
        need = n_batches * row.batch * row.seq
        ids = torch.tensor((ids * math.ceil(need / len(ids)))[:need]).view(n_batches, row.batch, row.seq)
        batches = []
        for chunk in ids:
            if family == "gpt2":
                batches.append({"input_ids": chunk, "labels": chunk, "attention_mask": torch.ones_like(chunk)})
                continue
            masked = torch.rand(chunk.shape, generator=generator) < 0.15
            batches.append({"input_ids": torch.where(masked, vocab_size - 1, chunk),
                            "labels": torch.where(masked, chunk, -100), "attention_mask": torch.ones_like(chunk)})
    return [{k: v.to(device) for k, v in b.items()} for b in batches]


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


def run_config(args, row, variant, mode, vocab_size, batches):
    device = args.device
    result = {"row": row.name, "model": row.model, "batch": row.batch, "seq_len": row.seq, "tokens": row.tokens,
              "variant": variant, "mode": mode, "vocab_size": vocab_size}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(0)
    model = build_model(row, vocab_size)
    if variant == "pixelfly":
        model, result["pixelfly"] = apply_pixelfly(model, row, args)
    model.to(device).train()
    result["params"] = sum(p.numel() for p in model.parameters())
    hyper = argparse.Namespace(learning_rate=MODELS[row.model].lr, weight_decay=0.01, adam_beta2=0.999)
    optimizer = make_optimizer(model, hyper, device)
    total_steps = args.warmup + args.steps + (args.profile_steps if args.profile else 0)
    scheduler = get_scheduler("linear", optimizer=optimizer, num_warmup_steps=0, num_training_steps=total_steps)
    forward = model if mode == "eager" else torch.compile(model, mode="reduce-overhead" if mode == "cudagraphs" else None)
    losses, counter = [], iter(range(10**9))

    def step():
        inputs = batches[next(counter) % len(batches)]
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = forward(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach().clone())  # clone: a CUDA-graph output is overwritten by the next replay

    torch._dynamo.utils.counters.clear()
    tick = time.perf_counter()
    step()
    sync(device)
    result["first_step_s"] = time.perf_counter() - tick
    for _ in range(args.warmup - 1):
        step()
    sync(device)
    result["warmup_s"] = time.perf_counter() - tick
    if mode != "eager":
        counters = torch._dynamo.utils.counters
        result["graph_breaks"] = sum(counters["graph_break"].values())
        result["graph_break_reasons"] = [str(reason)[:300] for reason in list(counters["graph_break"])[:5]]

    timer = StepTimer(device)
    timer.mark()
    for _ in range(args.steps):
        step()
        timer.mark()
    times = timer.step_ms()
    median = statistics.median(times)
    result.update(status="ok", step_ms=median, step_ms_min=min(times), step_ms_max=max(times),
                  tokens_per_s=row.tokens / (median / 1e3))
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30

    if args.profile:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        sync(device)
        with profile(activities=activities) as prof:
            for _ in range(args.profile_steps):
                step()
            sync(device)
        result["breakdown"] = breakdown(prof, device, args.profile_steps, median)
    trained = torch.stack(losses).float().cpu()
    result["steps_trained"] = len(trained)
    result["loss_end"] = trained[-LOSS_WINDOW:].mean().item()
    if not math.isfinite(result["loss_end"]):
        result["warning"] = f"loss is {result['loss_end']}: the numbers time a diverged run"
    return result


def release(device):
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def fmt(value, spec):
    return "–" if value is None else format(value, spec)


def best_dense(results):
    """Per row: the fastest dense result (the baseline a user would pick)."""
    best = {}
    for r in results:
        if r["variant"] == "dense" and r.get("status") == "ok":
            if r["row"] not in best or r["step_ms"] < best[r["row"]]["step_ms"]:
                best[r["row"]] = r
    return best


def summary_table(results):
    best = best_dense(results)
    lines = ["| row | variant | mode | step ms | tokens/s | speedup vs best dense | peak GiB | warm-up s | "
             f"loss after equal steps (vs dense) | note |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ok = r.get("status") == "ok"
        base = best.get(r["row"])
        speed = base["step_ms"] / r["step_ms"] if ok and base else None
        variant = r["variant"]
        if "pixelfly" in r:
            pf = r["pixelfly"]
            variant += f" ({pf['density']:.1%}, r={pf['low_rank']}{', sparse attn' if pf['attention'] == 'pixelfly' else ''})"
        loss = fmt(r.get("loss_end"), ".4f")
        if ok and base and r is not base and "loss_end" in base:
            loss += f" ({100 * (r['loss_end'] / base['loss_end'] - 1):+.1f}%)"
        note = r.get("error") or r.get("warning") or ("skipped: over --budget-s" if r.get("status") == "skipped" else "")
        if r.get("graph_breaks"):
            note = (note + f"; {r['graph_breaks']} graph breaks").lstrip("; ")
        lines.append(f"| {r['row']} | {variant} | {r['mode']} | {fmt(r.get('step_ms'), '.1f')} | "
                     f"{fmt(r.get('tokens_per_s'), ',.0f')} | {fmt(speed, '.2f')} | {fmt(r.get('peak_gib'), '.1f')} | "
                     f"{fmt(r.get('warmup_s'), '.1f')} | {loss} | {note.replace('|', '/')} |")
    return "\n".join(lines)


def breakdown_tables(results):
    profiled = [r for r in results if "breakdown" in r]
    if not profiled:
        return ""
    source = profiled[0]["breakdown"]["busy_source"]
    lines = [f"Per-step time by category, ms ({source}); host gap = step time - busy time.", "",
             "| row | variant | mode | step | busy | host gap | " + " | ".join(CATEGORIES) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(CATEGORIES)]
    for r in profiled:
        b = r["breakdown"]
        lines.append(f"| {r['row']} | {r['variant']} | {r['mode']} | {r['step_ms']:.1f} | {b['busy_ms_per_step']:.1f} | "
                     f"{b['host_gap_ms_per_step']:.1f} | "
                     + " | ".join(f"{b['category_ms_per_step'][c]:.1f}" for c in CATEGORIES) + " |")
    for r in profiled:
        lines += ["", f"Top kernels, {r['row']} {r['variant']} {r['mode']}:", "",
                  "| ms/step | % | category | name |", "|---|---|---|---|"]
        lines += [f"| {k['ms_per_step']:.2f} | {k['pct']:.1f} | {k['category']} | `{k['name'][:110]}` |"
                  for k in r["breakdown"]["top_kernels"]]
    return "\n".join(lines)


def plot(results, path):
    """Per row, the fastest mode of each variant as stacked per-category bars, in units of the dense step (so rows
    of very different sizes share one axis), the speedup above."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fastest = {}
    for r in results:
        key = (r["row"], r["variant"])
        if r.get("status") == "ok" and (key not in fastest or r["step_ms"] < fastest[key]["step_ms"]):
            fastest[key] = r
    rows = [row for row in dict.fromkeys(r["row"] for r in results) if (row, "dense") in fastest]
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(rows)), 4.5))
    colors = list(plt.get_cmap("tab10").colors[:len(CATEGORIES)]) + ["lightgrey"]
    width = 0.38
    for i, row in enumerate(rows):
        unit = fastest[(row, "dense")]["step_ms"]
        for j, variant in enumerate(VARIANTS):
            r = fastest.get((row, variant))
            if r is None:
                continue
            parts = r.get("breakdown", {}).get("category_ms_per_step", {})
            busy = sum(parts.values())
            scale = r["step_ms"] / busy if busy > r["step_ms"] else 1.0  # CPU self times can overlap
            heights = [parts.get(c, 0.0) * scale for c in CATEGORIES]
            heights.append(max(r["step_ms"] - sum(heights), 0.0))
            bottom = 0.0
            for c, height in enumerate(heights):
                ax.bar(i + (j - 0.5) * width, height / unit, width, bottom=bottom, color=colors[c],
                       hatch="//" if variant == "pixelfly" else None,
                       label=(list(CATEGORIES) + ["host gap / unprofiled"])[c] if (i, j) == (0, 0) else None)
                bottom += height / unit
        ours = fastest.get((row, "pixelfly"))
        if ours:
            ax.text(i, max(1.0, ours["step_ms"] / unit) + 0.03, f"{unit / ours['step_ms']:.2f}x", ha="center",
                    fontsize=9)
    ax.set_xticks(range(len(rows)), rows, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("step time / dense step time")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.15)
    ax.set_title("Training step: dense (left) vs Pixelfly (right, hatched), fastest mode each", fontsize=10)
    ax.legend(fontsize=7, ncol=4, loc="upper center")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def environment(device):
    env = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
           "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def write_outputs(args, results, start):
    """Write --json / --md / --plot with the results so far; return the title and the two tables."""
    details = breakdown_tables(results)
    table = summary_table(results)
    total = time.perf_counter() - start
    title = (f"Training step, {environment(args.device)['device']}, bf16 autocast, fp32 weights, the recipes' AdamW "
             f"({'fused' if args.device.type == 'cuda' else 'foreach'}), clip 1.0; {args.steps} timed steps after "
             f"{args.warmup} warm-up, medians; total {total:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"environment": environment(args.device), "total_s": total, "command": " ".join(sys.argv),
                "args": {k: (str(v) if isinstance(v, (Path, torch.device)) else
                             [x.name for x in v] if k == "rows" else v) for k, v in vars(args).items()}}
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(f"{title}\n\n{table}\n\n{details}\n")
    if args.plot and results:
        plot(results, args.plot)
    return title, table, details


def main(argv=None):
    start = time.perf_counter()
    args = parse_args(argv)
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    print(f"{environment(args.device)}\nPixelfly: density {args.density}, low rank {args.low_rank}, targets "
          f"{args.target_modules}; budget {args.budget_s:.0f} s", flush=True)
    results = []
    for row in args.rows:
        # text models: the tokenizer's ids plus BERT's mask token, padded for aligned LM-head GEMMs
        vocab_size = math.ceil((len(tokenizer) + 1) / args.vocab_multiple) * args.vocab_multiple
        batches = make_batches(row, vocab_size, tokenizer, 4, args.device)
        for mode in args.modes:
            for variant in args.variants:
                elapsed = time.perf_counter() - start
                head = {"row": row.name, "model": row.model, "batch": row.batch, "seq_len": row.seq,
                        "variant": variant, "mode": mode}
                if elapsed > args.budget_s:
                    results.append({**head, "status": "skipped"})
                    print(f"[{elapsed:5.0f}s] {row.name} {variant} {mode}: skipped (over --budget-s)")
                    continue
                print(f"[{elapsed:5.0f}s] {row.name} {variant} {mode} ...", flush=True)
                try:
                    result = run_config(args, row, variant, mode, vocab_size, batches)
                    print(f"        {result['step_ms']:.1f} ms/step, warm-up {result['warmup_s']:.1f} s, "
                          f"loss {result['loss_end']:.4f}", flush=True)
                except Exception as error:  # a failed compile or OOM must not stop the other configs
                    traceback.print_exc()
                    text = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
                    result = {**head, "status": "error", "error": text[:400]}
                    print(f"        failed: {result['error']}", flush=True)
                results.append(result)
                release(args.device)
                write_outputs(args, results, start)  # after every config, so a killed run keeps its results
    title, table, details = write_outputs(args, results, start)
    if details:
        print("\n" + details)
    print(f"\n{title}\n\n{table}")


if __name__ == "__main__":
    main()
