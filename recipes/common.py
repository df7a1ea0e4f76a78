"""Code shared by the accelerate recipes (gpt2_wikitext.py, vit_cifar.py, bert_glue.py).

Each recipe reads top to bottom: flags -> Accelerator -> data -> model (+ Pixelfly) -> optimizer ->
``fit`` -> ``finish``. This module holds the parts that are the same for all three: the shared flags and
the checks of flags, files and Hub access, the Pixelfly projection, the optimizer and schedule, the
training loop with atomic checkpoints, exact resume and the switch to dense (--densify_at), metrics
through local ``evaluate`` modules, and the final save / model card / Hub upload.
"""
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, DynamoBackend, TorchDynamoPlugin
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import SchedulerType, get_scheduler

import checkpoints
import pixelfly_hf  # noqa: F401  (registers the Pixelfly model types with the transformers Auto classes)
from inputs import RecipeError

RECIPES_DIR = Path(__file__).resolve().parent
METRICS_DIR = RECIPES_DIR / "metrics"
DATA_DIR = RECIPES_DIR / "data"
LOG_FILE = "train_log.jsonl"

logger = get_logger(__name__)


# ----------------------------------------------------------------------------------------------
# Flags


def add_training_args(parser, *, output_dir, learning_rate=None, batch_size=8, epochs=3, shipped=None):
    """The optimisation / checkpointing / tracking / Hub flags of transformers' *_no_trainer.py scripts.
    shipped: {flag name: default} that the recipe sets on its shipped data, said in --help."""
    shipped = shipped or {}

    def on_shipped(name):
        return f"; {shipped[name]:g} on the shipped data" if name in shipped else ""

    g = parser.add_argument_group("training")
    preset = "" if batch_size else " (default: the model preset's)"
    g.add_argument("--per_device_train_batch_size", type=int, default=batch_size,
                   help="examples per batch and process" + preset)
    g.add_argument("--per_device_eval_batch_size", type=int, default=batch_size,
                   help="the same for evaluation" + preset)
    g.add_argument("--learning_rate", type=float, default=learning_rate,
                   help="peak learning rate" + on_shipped("learning_rate")
                        + ("" if learning_rate else " (default: the model preset's)"))
    g.add_argument("--weight_decay", type=float, default=0.0, help="AdamW's, not on biases and norms")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW's beta2")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping; 0 disables it")
    g.add_argument("--num_train_epochs", type=int, default=None, help=f"default: {epochs}")
    g.add_argument("--max_train_steps", type=int, default=None,
                   help="optimizer steps; overrides --num_train_epochs" + on_shipped("max_train_steps"))
    g.add_argument("--densify_at", type=float, default=None,
                   help="train Pixelfly for this fraction of --max_train_steps (or of --max_train_minutes, "
                        "whichever comes first), then merge it into dense matrices (merge_and_unload) and train "
                        "those for the rest; AdamW state carries over for the unchanged parameters")
    g.add_argument("--max_train_minutes", type=float, default=None,
                   help="also stop once training (not evaluation) has taken this long, checked every "
                        "--logging_steps; for equal-time comparisons (pair it with a constant lr schedule)")
    g.add_argument("--torch_compile", choices=["auto", "off", "default", "cudagraphs"], default="auto",
                   help="auto: on a GPU, torch.compile with the recipe's fastest safe mode (CUDA graphs where every "
                        "batch has one shape: GPT-2, ViT in one process; plain compile for BERT's padded batches "
                        "and for several processes) unless "
                        "`accelerate launch --dynamo_backend` chose one; on CPU, eager. off: eager. default / "
                        "cudagraphs: torch.compile without / with CUDA graphs (mode reduce-overhead)")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="batches per optimizer step")
    g.add_argument("--lr_scheduler_type", type=SchedulerType, default="linear",
                   choices=[s.value for s in SchedulerType], help="learning-rate schedule after the warmup")
    g.add_argument("--num_warmup_steps", type=int, default=0,
                   help="optimizer steps of linear warmup" + on_shipped("num_warmup_steps"))
    g.add_argument("--seed", type=int, default=42, help="model init, shuffling and dropout")
    g.add_argument("--eval_steps", type=int, default=0,
                   help="evaluate every N optimizer steps (0: only before and after training)")
    g.add_argument("--max_train_samples", type=int, default=None, help="truncate the training set")
    g.add_argument("--max_eval_samples", type=int, default=None, help="truncate the evaluation set")
    g.add_argument("--preprocessing_num_workers", type=int, default=None,
                   help="processes for tokenizing (default: this one)")
    g.add_argument("--logging_steps", type=int, default=10, help="log loss, lr and throughput every N steps")
    g.add_argument("--output_dir", type=str, default=output_dir,
                   help="where the model, its card, metrics and checkpoints go (default: outputs/<model>-pixelfly "
                        "or -dense)")
    g.add_argument("--checkpointing_steps", type=str, default=None,
                   help="save a resumable checkpoint every N optimizer steps, or 'epoch'")
    g.add_argument("--resume_from_checkpoint", type=str, default=None,
                   help="a checkpoint folder, or 'latest' (the newest complete one in --output_dir)")
    g.add_argument("--with_tracking", action="store_true", help="log to the trackers in --report_to")
    g.add_argument("--report_to", type=str, default="tensorboard",
                   help="accelerate tracker(s): tensorboard, wandb, ... or 'all'")
    g.add_argument("--push_to_hub", action="store_true", help="upload the final folder to the Hugging Face Hub")
    g.add_argument("--hub_model_id", type=str, default=None, help="the repo to push to (default: --output_dir's name)")
    g.add_argument("--hub_token", type=str, default=None, help="(default: the logged-in token)")
    g.add_argument("--hub_private_repo", action="store_true", help="create the repo private")
    parser.set_defaults(default_num_train_epochs=epochs)
    return parser


def add_pixelfly_args(parser, *, target_modules=("attn", "mlp"), density=0.25, block_size=32):
    g = parser.add_argument_group("pixelfly")
    g.add_argument("--dense", action="store_true",
                   help="train the same model without Pixelfly (the baseline for comparisons)")
    g.add_argument("--density", type=float, default=density,
                   help="fraction of the dense parameters kept in each targeted matrix, low rank included, in (0, 1]")
    g.add_argument("--low_rank", type=int, default=None,
                   help="rank of the low-rank term (0: none); lowered, with a warning, where --density has no room "
                        "for it (default: the planner picks each matrix's rank, up to 32, leaving room for "
                        "butterfly factors; the printed plan shows it)")
    g.add_argument("--pixelfly_block_size", type=int, default=block_size,
                   help="the kernel's minimum tile edge (power of 2, >= 16); small models need small tiles"
                        + ("" if block_size else " (default: the model preset's; 32 with --model_name_or_path)"))
    g.add_argument("--calibration_batches", type=int, default=0,
                   help="with a pretrained model: fit each projected matrix to its outputs on this many training "
                        "batches instead of to its weights (0: fit the weights)")
    g.add_argument("--pixelfly_attention", choices=["dense", "pixelfly"], default="dense",
                   help="attention scores: dense SDPA, or Pixelfly block-sparse + low-rank attention")
    g.add_argument("--target_modules", nargs="+", default=list(target_modules),
                   help=f"which matrices to replace: roles (attn, mlp) or module names (default: "
                        f"{' '.join(target_modules)})")
    return parser


def check_args(args, *, pretrained: bool):
    """Validate flags that need no data or model (pretrained: the recipe starts from --model_name_or_path's
    weights). Raises RecipeError naming the bad value and the fix."""
    if not args.dense:
        if not 0.0 < args.density <= 1.0:
            raise RecipeError(f"--density {args.density} is out of range: give a fraction in (0, 1], "
                              "e.g. --density 0.25 (or --dense for no Pixelfly)")
        if args.low_rank is not None and args.low_rank < 0:
            raise RecipeError(f"--low_rank {args.low_rank} is negative: give 0 (no low-rank term) or a rank like 32")
        if args.calibration_batches < 0:
            raise RecipeError(f"--calibration_batches {args.calibration_batches} is negative: give 0 (fit the "
                              "weights) or a few batches, e.g. 8")
        if args.calibration_batches and not pretrained:
            raise RecipeError(f"--calibration_batches {args.calibration_batches} fits projected pretrained matrices, "
                              "but this model trains from scratch: give --model_name_or_path, or leave the flag out")
        bs = args.pixelfly_block_size
        if bs < 1 or bs & (bs - 1):
            raise RecipeError(f"--pixelfly_block_size {bs} is not a power of 2: use 16, 32, 64 or 128")
    if args.num_train_epochs is None:
        args.num_train_epochs = args.default_num_train_epochs
    if args.densify_at is not None:
        if args.dense:
            raise RecipeError("--densify_at switches a Pixelfly model to dense: leave out --dense")
        if not 0.0 < args.densify_at < 1.0:
            raise RecipeError(f"--densify_at {args.densify_at} is out of range: give a fraction of the training "
                              "steps in (0, 1), e.g. --densify_at 0.75")
    for flag in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                 "num_train_epochs", "logging_steps"):
        if getattr(args, flag) < 1:
            raise RecipeError(f"--{flag} {getattr(args, flag)} must be >= 1")
    if args.max_train_steps is not None and args.max_train_steps < 1:
        raise RecipeError(f"--max_train_steps {args.max_train_steps} must be >= 1")
    if args.max_train_minutes is not None and not args.max_train_minutes > 0:
        raise RecipeError(f"--max_train_minutes {args.max_train_minutes} must be > 0 (leave it out for no limit)")
    if args.checkpointing_steps is not None and args.checkpointing_steps != "epoch":
        if not args.checkpointing_steps.isdigit() or int(args.checkpointing_steps) < 1:
            raise RecipeError(f"--checkpointing_steps {args.checkpointing_steps!r}: give a positive number of "
                              "optimizer steps or 'epoch'")
    if args.push_to_hub and not args.hub_model_id:
        args.hub_model_id = Path(args.output_dir).resolve().name
    if args.resume_from_checkpoint not in (None, "latest") and not Path(args.resume_from_checkpoint).is_dir():
        raise RecipeError(f"--resume_from_checkpoint {args.resume_from_checkpoint}: no such folder; give a "
                          f"checkpoint folder (e.g. {args.output_dir}/step_100) or 'latest'")


def default_output_dir(args, name):
    """The --output_dir used when none is given: outputs/<name>-dense or outputs/<name>-pixelfly."""
    return f"outputs/{name}-{'dense' if args.dense else 'pixelfly'}"


def resolve_defaults(args, preset, *, family, finetune_lr):
    """Fill the flags left at None whose default depends on the run: --learning_rate and
    --pixelfly_block_size from the from-scratch `preset` (its "lr" and "block_size"), or finetune_lr and
    32 with --model_name_or_path; the batch sizes from the preset's "batch_size"; --output_dir from the
    checkpoint's name or "<family>-<model_size>"."""
    for flag in ("per_device_train_batch_size", "per_device_eval_batch_size"):
        if getattr(args, flag) is None:
            setattr(args, flag, preset["batch_size"])
    if args.learning_rate is None:
        args.learning_rate = finetune_lr if args.model_name_or_path else preset["lr"]
    if args.pixelfly_block_size is None:
        args.pixelfly_block_size = 32 if args.model_name_or_path else preset["block_size"]
    if args.output_dir is None:
        name = Path(args.model_name_or_path).name if args.model_name_or_path else f"{family}-{args.model_size}"
        args.output_dir = default_output_dir(args, name)
    return args


def is_main_process():
    """Rank 0 of a launch (before the Accelerator exists): only it prints the run's first line."""
    return int(os.environ.get("RANK", "0")) == 0


def announce(line):
    """The run's first line: what trains on what."""
    if is_main_process():
        print(line, flush=True)


# ----------------------------------------------------------------------------------------------
# Setup


def compile_plugin(args, *, fixed_shapes, cuda):
    """How the Accelerator compiles the model (--torch_compile). `accelerate launch --dynamo_backend` always sets
    ACCELERATE_DYNAMO_BACKEND (NO when not asked), which TorchDynamoPlugin() reads: 'auto' keeps any backend
    chosen there and compiles on a GPU otherwise, since the Pixelfly step issues a few hundred Triton launches
    whose host time compilation and CUDA graphs take away."""
    launched = TorchDynamoPlugin()
    choice = args.torch_compile
    if choice == "off" or (choice == "auto" and (launched.backend != DynamoBackend.NO or not cuda)):
        return TorchDynamoPlugin(backend="no") if choice == "off" else launched
    if choice == "auto":
        # a batch of a new shape would record a new graph: CUDA graphs only where every batch has one shape, and
        # in one process (graphs around DDP's gradient all-reduce were not tried)
        single = int(os.environ.get("WORLD_SIZE", "1")) == 1
        choice = "cudagraphs" if fixed_shapes and single else "default"
    return TorchDynamoPlugin(backend="inductor", mode="reduce-overhead" if choice == "cudagraphs" else "default")


def make_accelerator(args, *, fixed_shapes):
    """Mixed precision, distribution and CPU use come from `accelerate launch` / its config file; compilation
    from --torch_compile (compile_plugin). fixed_shapes: every training batch has the same shape."""
    plugin = compile_plugin(args, fixed_shapes=fixed_shapes, cuda=torch.cuda.is_available())
    if plugin.backend != DynamoBackend.NO:
        mode = "with CUDA graphs" if plugin.mode == "reduce-overhead" else f"mode {plugin.mode}"
        if is_main_process():
            print(f"compiling the model: torch.compile {plugin.backend.value.lower()}, {mode} "
                  "(--torch_compile off for eager)", flush=True)
    accelerator = Accelerator(
        dynamo_plugin=plugin,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to if args.with_tracking else None,
        project_dir=args.output_dir,
        # The shuffle order is a function of (seed, epoch) only, so a resumed run sees the same batches.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    return accelerator


def load_metric(name):
    """An evaluate metric from recipes/metrics/<name>/ (works offline, unlike evaluate.load("<name>"))."""
    import evaluate

    return evaluate.load(str(METRICS_DIR / name), keep_in_memory=True)


def limit_samples(args, train_set, eval_set):
    """The first --max_train_samples / --max_eval_samples examples of each split (all without the flag)."""
    if args.max_train_samples is not None:
        train_set = train_set.select(range(min(args.max_train_samples, len(train_set))))
    if args.max_eval_samples is not None:
        eval_set = eval_set.select(range(min(args.max_eval_samples, len(eval_set))))
    return train_set, eval_set


def apply_pixelfly(model, args, accelerator, *, pretrained, train_dataloader):
    """Replace the targeted dense matrices with Pixelfly ones (before accelerator.prepare).

    A pretrained model's matrices are projected onto the structure (fitted to their outputs on the first
    --calibration_batches training batches, if any); a from-scratch one is re-initialised.
    Returns the model and its sparsity summary (None with --dense)."""
    if args.dense:
        return model, None
    from pixelfly_hf import PixelflyConfig, get_model

    calibration = itertools.islice(train_dataloader, args.calibration_batches) if args.calibration_batches else None
    try:
        config = PixelflyConfig(density=args.density, target_modules=list(args.target_modules),
                                block_size=args.pixelfly_block_size, low_rank=args.low_rank,
                                attention=args.pixelfly_attention, init="project" if pretrained else "random")
        model = get_model(model, config, calibration_data=calibration)
    except ValueError as error:
        raise RecipeError(f"the Pixelfly flags do not fit this model: {error} (adjust --density, --low_rank, "
                          "--pixelfly_block_size or --target_modules)") from None
    if accelerator.is_main_process:
        summary = model.print_sparsity_summary()
        errors = [row["projection_error"] for row in summary["layers"] if row["projection_error"] is not None]
        if errors:
            fitted = (f"its outputs on {args.calibration_batches} training batches" if calibration is not None
                      else "its weights")
            print(f"projected: each matrix fitted to {fitted}, relative error {sum(errors) / len(errors):.3f} on "
                  f"average, {max(errors):.3f} at most", flush=True)
    else:
        summary = None
    return model, summary


def make_train_dataloader(train_set, args, collate_fn):
    """Shuffled training batches, without the short last batch: under torch.compile (accelerate's
    --dynamo_backend) its new shape recompiles the model at every epoch end (27-46 s each for GPT-2 small on
    an H200, docs/dev/benchmarks-log.md)."""
    return DataLoader(train_set, shuffle=True, collate_fn=collate_fn, batch_size=args.per_device_train_batch_size,
                      drop_last=True)


def make_optimizer(model, args, device):
    """AdamW (fused into one kernel per step on GPU); no weight decay on biases and norm weights."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "norm" in name.lower() else decay).append(param)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(0.9, args.adam_beta2),
                             fused=device.type == "cuda")


def plan_steps(args, num_batches_per_epoch):
    """Fill in max_train_steps / num_train_epochs from the prepared dataloader's length."""
    steps_per_epoch = math.ceil(num_batches_per_epoch / args.gradient_accumulation_steps)
    if steps_per_epoch == 0:
        raise RecipeError("the training set gives no batches: add data, or lower --per_device_train_batch_size "
                          "/ the sequence length")
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    return steps_per_epoch


def make_scheduler(optimizer, args, accelerator, train_dataloader):
    """The lr schedule over max_train_steps (call before prepare, with the unprepared dataloader)."""
    plan_steps(args, math.ceil(len(train_dataloader) / accelerator.num_processes))
    return lr_schedule(optimizer, args, accelerator.num_processes)


def lr_schedule(optimizer, args, num_processes):
    # A prepared scheduler steps once per process per optimizer step (accelerate/scheduler.py).
    return get_scheduler(args.lr_scheduler_type, optimizer=optimizer,
                         num_warmup_steps=args.num_warmup_steps * num_processes,
                         num_training_steps=args.max_train_steps * num_processes)


def init_tracking(accelerator, args, project_name):
    if not args.with_tracking:
        return
    config = {k: (v.value if hasattr(v, "value") else v) for k, v in vars(args).items()}
    config = {k: (" ".join(map(str, v)) if isinstance(v, list) else v) for k, v in config.items()
              if isinstance(v, (int, float, str, bool, list))}
    accelerator.init_trackers(project_name, config)


# ----------------------------------------------------------------------------------------------
# Training loop


class TrainLog:
    """One JSON line per logging step in output_dir/train_log.jsonl (main process), plus trackers."""

    def __init__(self, accelerator, args, resumed_step):
        """A fresh run starts a new log; a resumed one keeps the records up to its checkpoint."""
        self.accelerator = accelerator
        self.with_tracking = args.with_tracking
        self.path = Path(args.output_dir) / LOG_FILE
        if accelerator.is_main_process:
            # made only now, so a run stopped by a bad input leaves no --output_dir behind
            self.path.parent.mkdir(parents=True, exist_ok=True)
            kept = []
            if resumed_step is not None and self.path.is_file():
                records = [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
                kept = [r for r in records if r["step"] <= resumed_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record, step):
        if self.with_tracking:
            self.accelerator.log(record, step=step)
        if self.accelerator.is_main_process:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **record}) + "\n")


def fit(accelerator, args, model, optimizer, lr_scheduler, train_dataloader, evaluate_fn, count_fn,
        unit="tokens"):
    """The training loop of the *_no_trainer.py scripts, with exact resume.

    evaluate_fn(model) -> dict of metrics (computed with gather_for_metrics, same on every process).
    count_fn(batch) -> number of `unit`s (tokens, images, ...) in this process's batch, for throughput.
    Returns (model, result): the model trained last (the dense one after --densify_at) and {"initial_eval",
    "final_eval", "throughput", "train_seconds", "completed_steps", "stopped_by", "densified_at"}.
    Every eval record in the log also carries train/seconds and train/<unit> so far (loss-vs-time plots).
    """
    plan_steps(args, len(train_dataloader))  # the prepared loader's length, per process
    densify_step = None
    if args.densify_at is not None:
        densify_step = min(max(round(args.densify_at * args.max_train_steps), 1), args.max_train_steps - 1)
    checkpoint_every = args.checkpointing_steps
    resume_dir = checkpoints.find_checkpoint(args)
    state = {"completed_steps": 0, "epoch": 0, "batches_in_epoch": 0, "train_seconds": 0.0, "units_seen": 0}
    if resume_dir is not None:
        state = checkpoints.read_checkpoint_state(resume_dir)
    total_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(f"***** Running training ***** examples/epoch = {len(train_dataloader.dataset)}, "
                f"epochs = {args.num_train_epochs}, total batch = {total_batch}, "
                f"optimizer steps = {args.max_train_steps}", main_process_only=True)
    log = TrainLog(accelerator, args, state["completed_steps"] if resume_dir is not None else None)

    # train/seconds and train/<unit> count from the first step, across resumes
    train_seconds, units_total = state["train_seconds"], state["units_seen"]
    window_units, window_seconds, window_loss, window_micro = 0, 0.0, 0.0, 0

    def seen():
        """Training seconds and units so far, the open logging window included."""
        return train_seconds + window_seconds, units_total + window_units * accelerator.num_processes

    def eval_record(metrics):
        seconds, units_seen = seen()
        return {**{f"eval/{k}": v for k, v in metrics.items()}, "train/seconds": seconds, f"train/{unit}": units_seen}

    def checkpoint_state(**position):
        seconds, units_seen = seen()
        return {"completed_steps": completed_steps, **position, "train_seconds": seconds, "units_seen": units_seen,
                "densified": densified_at is not None, "densified_at": densified_at}

    def resume_from(checkpoint):
        nonlocal model, optimizer, lr_scheduler, densified_at
        if state.get("densified") and densified_at is None:
            # the checkpoint holds the dense model and its optimizer: switch first so that they load into it
            model, optimizer, lr_scheduler = densify(accelerator, model, optimizer, lr_scheduler, args)
            densified_at = state.get("densified_at", densify_step)
        accelerator.load_state(str(checkpoint))
        accelerator.print(f"resumed from {checkpoint} at step {state['completed_steps']}")

    result = {"initial_eval": None}
    if resume_dir is None:
        result["initial_eval"] = evaluate_fn(model)
        accelerator.print(f"before training: {format_metrics(result['initial_eval'])}")
        log.write(eval_record(result["initial_eval"]), step=0)

    densified_at = None  # the step of the switch to dense
    if resume_dir is not None and state["completed_steps"] >= args.max_train_steps:
        resume_from(resume_dir)  # already finished: just reload
        resume_dir = None
    progress = tqdm(range(args.max_train_steps), initial=state["completed_steps"],
                    disable=not accelerator.is_local_main_process)
    completed_steps = state["completed_steps"]
    time_budget = args.max_train_minutes * 60 if args.max_train_minutes else math.inf
    densify_seconds = args.densify_at * time_budget if args.densify_at is not None else math.inf
    stopped_by = "steps"
    for epoch in range(state["epoch"], args.num_train_epochs):
        if completed_steps >= args.max_train_steps or stopped_by == "time":
            break
        model.train()
        skip = state["batches_in_epoch"] if (resume_dir is not None and epoch == state["epoch"]) else 0
        loader = accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader
        loader.set_epoch(epoch)
        batches = iter(loader)
        first = next(batches, None)
        if resume_dir is not None:
            # Restore model/optimizer/scheduler/RNG only now: starting the data iterator above draws from
            # the global RNG, which the uninterrupted run did before the checkpoint was written.
            resume_from(resume_dir)
            resume_dir = None
        batch_in_epoch = skip
        tick = time.perf_counter()
        for batch in itertools.chain([first], batches) if first is not None else ():
            with accelerator.accumulate(model):
                loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            batch_in_epoch += 1
            window_loss += loss.detach().double()
            window_micro += 1
            window_units += count_fn(batch)
            if not accelerator.sync_gradients:
                continue
            completed_steps += 1
            progress.update(1)
            now = time.perf_counter()
            window_seconds += now - tick
            densify_now = completed_steps == densify_step
            if completed_steps % args.logging_steps == 0 or completed_steps == args.max_train_steps:
                units = torch.tensor(float(window_units), dtype=torch.float64, device=accelerator.device)
                # the time checks ride on this reduction, so every process stops (or densifies) at the same step
                clock = seen()[0]
                over_time = torch.tensor([float(clock >= time_budget), float(clock >= densify_seconds)],
                                         dtype=torch.float64, device=accelerator.device)
                stats = accelerator.reduce(torch.cat([torch.stack([window_loss / window_micro, units]), over_time]),
                                           reduction="sum")
                train_loss = stats[0].item() / accelerator.num_processes
                units = int(stats[1].item())
                if stats[2].item() > 0:
                    stopped_by = "time"
                densify_now = densify_now or stats[3].item() > 0
                record = {"train/loss": train_loss, "train/lr": lr_scheduler.get_last_lr()[0],
                          f"train/{unit}_per_second": units / window_seconds, "epoch": epoch}
                log.write(record, step=completed_steps)
                progress.set_postfix(loss=f"{train_loss:.4f}", **{f"{unit}/s": f"{units / window_seconds:,.0f}"})
                train_seconds += window_seconds
                units_total += units
                window_units, window_seconds, window_loss, window_micro = 0, 0.0, 0.0, 0
            if densify_now and densified_at is None and stopped_by != "time":
                # the merge counts as training time: an equal-time comparison must pay for it
                tick = time.perf_counter()
                model, optimizer, lr_scheduler = densify(accelerator, model, optimizer, lr_scheduler, args)
                densified_at = completed_steps
                model.train()
                window_seconds += time.perf_counter() - tick
                accelerator.print(f"step {completed_steps}: merged the Pixelfly matrices into dense ones "
                                  f"(--densify_at {args.densify_at}); training on dense")
            last_step = completed_steps >= args.max_train_steps or stopped_by == "time"  # evaluated after the loop
            if args.eval_steps and completed_steps % args.eval_steps == 0 and not last_step:
                metrics = evaluate_fn(model)
                model.train()
                accelerator.print(f"step {completed_steps}: {format_metrics(metrics)}")
                log.write(eval_record(metrics), step=completed_steps)
            if checkpoint_every not in (None, "epoch") and completed_steps % int(checkpoint_every) == 0:
                checkpoints.save_checkpoint(accelerator, args.output_dir, f"step_{completed_steps}",
                                checkpoint_state(epoch=epoch, batches_in_epoch=batch_in_epoch))
            if last_step:
                break
            tick = time.perf_counter()
        if checkpoint_every == "epoch":
            # a run stopped by steps or time (the loop broke off) records where it stopped, so a resume (say,
            # with more time) continues inside this epoch instead of skipping its remaining batches
            if completed_steps >= args.max_train_steps or stopped_by == "time":
                position = checkpoint_state(epoch=epoch, batches_in_epoch=batch_in_epoch)
            else:
                position = checkpoint_state(epoch=epoch + 1, batches_in_epoch=0)
            checkpoints.save_checkpoint(accelerator, args.output_dir, f"epoch_{epoch}", position)
    progress.close()

    result["final_eval"] = evaluate_fn(model)
    accelerator.print(f"after training ({completed_steps} steps, stopped by {stopped_by}): "
                      f"{format_metrics(result['final_eval'])}")
    log.write(eval_record(result["final_eval"]), step=completed_steps)
    result.update(completed_steps=completed_steps, train_seconds=train_seconds, stopped_by=stopped_by,
                  throughput=units_total / train_seconds if train_seconds else None, unit=unit,
                  densified_at=densified_at)
    if args.with_tracking:
        accelerator.end_training()
    return model, result


def densify(accelerator, model, optimizer, lr_scheduler, args):
    """Merge the prepared Pixelfly model into its stock dense model (merge_and_unload) and prepare it again with
    a new optimizer. AdamW state carries over, keyed by parameter name, for every parameter whose name and shape
    the merge keeps (embeddings, norms, biases); the merged dense weights start with fresh moments. The new
    scheduler continues the old one's schedule from its step."""
    unwrapped = accelerator.unwrap_model(model)
    old_state = {name: optimizer.optimizer.state[p] for name, p in unwrapped.named_parameters()
                 if p in optimizer.optimizer.state}
    old_schedule = lr_scheduler.scheduler.state_dict()
    unwrapped = unwrapped.merge_and_unload()
    accelerator.free_memory()  # forget the old model/optimizer/scheduler (save_state would write them too)
    new_optimizer = make_optimizer(unwrapped, args, accelerator.device)
    for name, p in unwrapped.named_parameters():
        carried = old_state.get(name)
        if carried is not None and carried["exp_avg"].shape == p.shape:
            new_optimizer.state[p] = carried
    new_scheduler = lr_schedule(new_optimizer, args, accelerator.num_processes)
    new_scheduler.load_state_dict(old_schedule)
    for group, lr in zip(new_optimizer.param_groups, new_scheduler.get_last_lr()):
        group["lr"] = lr
    return accelerator.prepare(unwrapped, new_optimizer, new_scheduler)


def format_metrics(metrics):
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


# ----------------------------------------------------------------------------------------------
# Saving


def save_model(accelerator, model, args, processor=None):
    """safetensors weights + config (+ tokenizer / image processor) in args.output_dir."""
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    state_dict = accelerator.get_state_dict(model)  # gathers FSDP shards; every process must call it
    unwrapped.save_pretrained(args.output_dir, is_main_process=accelerator.is_main_process,
                              save_function=accelerator.save, state_dict=state_dict, safe_serialization=True)
    if processor is not None and accelerator.is_main_process:
        processor.save_pretrained(args.output_dir)
    accelerator.wait_for_everyone()


def finish(accelerator, args, model, result, sparsity, *, processor, recipe, base, dataset, model_class, metric,
           tags, extra=None):
    """The recipes' main() tail: save the model and its tokenizer / image processor, all_results.json and the
    model card; print the metric before and after and how to reload; push with --push_to_hub."""
    save_model(accelerator, model, args, processor)
    if accelerator.is_main_process:
        results = write_results(args, result, sparsity, extra)
        write_model_card(accelerator.unwrap_model(model), args, result, results, recipe=recipe, base=base,
                         dataset=dataset, model_class=model_class, tags=tags)
        processor_class = "AutoImageProcessor" if hasattr(processor, "image_mean") else "AutoTokenizer"
        initial, final = result["initial_eval"], result["final_eval"]
        if initial:  # none after a resume
            print(f"validation {metric}: {initial[metric]:.4f} before -> {final[metric]:.4f} after "
                  f"{result['completed_steps']} steps")
        print(f"throughput: {result['throughput']:,.0f} {result['unit']}/s over {result['train_seconds']:.1f} s of "
              f"training\nsaved to {args.output_dir}\nload it with:\n    import pixelfly_hf  # registers the Pixelfly "
              f"model types\n    from transformers import {model_class}, {processor_class}\n"
              f"    model = {model_class}.from_pretrained({args.output_dir!r})\n"
              f"    processor = {processor_class}.from_pretrained({args.output_dir!r})")
    push_to_hub(accelerator, args, "End of training")


def write_results(args, result, sparsity, extra=None):
    """all_results.json in output_dir (main process only)."""
    results = {**{f"eval_{k}": v for k, v in result["final_eval"].items()},
               **({f"initial_eval_{k}": v for k, v in result["initial_eval"].items()}
                  if result["initial_eval"] else {}),
               "completed_steps": result["completed_steps"], "train_seconds": result["train_seconds"],
               "stopped_by": result["stopped_by"],
               f"train_{result['unit']}_per_second": result["throughput"],
               "pixelfly": not args.dense and result["densified_at"] is None,
               "densified_at_step": result["densified_at"],
               "density": sparsity.get("density") if sparsity and result["densified_at"] is None else 1.0,
               "calibration_batches": 0 if args.dense else args.calibration_batches,
               **(extra or {})}
    (Path(args.output_dir) / "all_results.json").write_text(json.dumps(results, indent=2))
    return results


def write_model_card(model, args, result, results, *, recipe, base, dataset, model_class, tags):
    """README.md in output_dir: the library's Pixelfly card (structure, how to load) or a dense one, then how it
    was trained, the final metrics and every flag."""
    from pixelfly_hf.models.card import model_card

    if result["densified_at"] is not None:
        how = (f"Pixelfly {base}, trained for {result['densified_at']} steps, then merged into dense matrices "
               f"(`--densify_at {args.densify_at}`) and trained dense for the remaining steps,")
    else:
        how = f"{'Dense baseline' if args.dense else 'Pixelfly'} {base}, trained"
    flags = {k: (v.value if hasattr(v, "value") else v) for k, v in sorted(vars(args).items()) if k != "hub_token"}
    sections = "\n".join([
        "## Training", "", f"{how} with the pixelfly_hf recipe `recipes/{recipe}` on {dataset}.", "",
        "## Results", "", "| metric | value |", "|---|---|",
        *(f"| {k} | {v:.6g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in results.items()), "",
        "## Training flags", "", "```json", json.dumps(flags, indent=2, default=str), "```", ""])
    if hasattr(model, "sparsity_summary"):
        card = model_card(model, repo_id=args.hub_model_id, tags=tags, sections=sections)
    else:
        card = "\n".join(["---", "library_name: transformers", "tags:", *(f"- {t}" for t in tags), "---", "",
                          f"# {Path(args.output_dir).name}", "", f"A dense {type(model).__name__} (no Pixelfly "
                          "matrices): it loads with transformers alone.", "", "```python",
                          f"from transformers import {model_class}", "",
                          f"model = {model_class}.from_pretrained({str(args.hub_model_id or args.output_dir)!r})",
                          "```", "", sections])
    (Path(args.output_dir) / "README.md").write_text(card)


def push_to_hub(accelerator, args, commit_message):
    if not args.push_to_hub or not accelerator.is_main_process:
        return None
    from huggingface_hub import HfApi

    api = HfApi(token=args.hub_token)
    repo_id = api.create_repo(args.hub_model_id, exist_ok=True, private=args.hub_private_repo).repo_id
    api.upload_folder(repo_id=repo_id, folder_path=args.output_dir, commit_message=commit_message,
                      ignore_patterns=["step_*", "epoch_*", f"{checkpoints.TMP_PREFIX}*"])
    accelerator.print(f"pushed to https://huggingface.co/{repo_id}")
    return repo_id


def fail(error):
    """Print a RecipeError as one line without a traceback and exit with status 1."""
    print(f"error: {error}", file=sys.stderr)
    raise SystemExit(1)


def run(main):
    """A recipe's `if __name__ == "__main__":` entry: main(), with a RecipeError reported by `fail`."""
    try:
        main()
    except RecipeError as error:
        fail(error)
