"""The command line of a training script in the style of transformers' *_no_trainer.py examples: the shared training
and Pixelfly flags, their defaults and their checks. Every check ends in one RecipeError naming the flag and the fix;
the Pixelfly flags are checked by building the PixelflyConfig from them, the one place that knows their rules."""
import argparse
import os
from pathlib import Path

from transformers import SchedulerType

from ..config import PixelflyConfig
from .errors import RecipeError

# projected pretrained matrices are fitted to their outputs on this many training batches unless told otherwise
DEFAULT_CALIBRATION_BATCHES = 8


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help shows every flag's default, except where the help text already says it (a default resolved per run,
    left None in the parser) and for on/off switches."""

    def _get_help_string(self, action):
        text = action.help
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS \
                or "default:" in text:
            return text
        return f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are RecipeErrors, so that every bad input ends the same way: one `error:`
    line and exit status 1 (run_main)."""

    def __init__(self, doc):
        super().__init__(description=doc, formatter_class=HelpFormatter)

    def error(self, message):
        raise RecipeError(f"{message} (see {self.prog} --help)")


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
    g.add_argument("--calibration_batches", type=int, default=None,
                   help="with a pretrained model: fit each projected matrix to its outputs on this many training "
                        "batches instead of to its weights (0: fit the weights; default: 8 with pretrained weights, "
                        "which halved the fine-tuned accuracy gap to dense in docs/dev/benchmarks-log.md)")
    g.add_argument("--compare_dense_steps", type=int, default=0,
                   help="before training, time this many steps of the same model left dense (same batches, "
                        "precision, compile mode and optimizer) and print its rate beside Pixelfly's at the end "
                        "(one process; 0: no comparison)")
    g.add_argument("--pixelfly_attention", choices=["dense", "pixelfly"], default="dense",
                   help="attention scores: dense SDPA, or Pixelfly block-sparse + low-rank attention")
    g.add_argument("--target_modules", nargs="+", default=list(target_modules),
                   help=f"which matrices to replace: roles (attn, mlp) or module names (default: "
                        f"{' '.join(target_modules)})")
    return parser


# PixelflyConfig field: (its flag, what to say when PixelflyConfig refuses the flag's value)
PIXELFLY_FLAGS = {
    "density": ("density", "is out of range: give a fraction in (0, 1], e.g. --density 0.25 (or --dense for no "
                           "Pixelfly)"),
    "low_rank": ("low_rank", "is negative: give 0 (no low-rank term) or a rank like 32"),
    "block_size": ("pixelfly_block_size", "is not a power of 2 of at least 16: use 16, 32, 64 or 128"),
}


def pixelfly_config(args, *, pretrained: bool):
    """The PixelflyConfig of the Pixelfly flags (None with --dense): a pretrained model's matrices are projected,
    a from-scratch one's re-initialised. A value PixelflyConfig refuses is a RecipeError naming its flag."""
    if args.dense:
        return None
    fields = {"density": args.density, "low_rank": args.low_rank, "block_size": args.pixelfly_block_size,
              "target_modules": list(args.target_modules)}
    try:
        return PixelflyConfig(**fields, attention=args.pixelfly_attention, init="project" if pretrained else "random")
    except ValueError as error:
        # PixelflyConfig's messages open with the field they refuse, "<field>=<value>"
        field = next((f for f in PIXELFLY_FLAGS if str(error).startswith(f"{f}=")), None)
        if field is None:
            raise RecipeError(f"the Pixelfly flags are not valid: {error} (adjust --target_modules)") from None
        flag, why = PIXELFLY_FLAGS[field]
        raise RecipeError(f"--{flag} {fields[field]} {why}") from None


def check_args(args, *, pretrained: bool):
    """Validate the flags that need no data or model, and build args.pixelfly_config from the Pixelfly flags
    (pretrained: the script starts from --model_name_or_path's weights). Raises RecipeError naming the bad value
    and the fix."""
    args.pixelfly_config = pixelfly_config(args, pretrained=pretrained)
    if args.calibration_batches is None:
        args.calibration_batches = DEFAULT_CALIBRATION_BATCHES if pretrained and not args.dense else 0
    if not args.dense:
        if args.calibration_batches < 0:
            raise RecipeError(f"--calibration_batches {args.calibration_batches} is negative: give 0 (fit the "
                              "weights) or a few batches, e.g. 8")
        if args.calibration_batches and not pretrained:
            raise RecipeError(f"--calibration_batches {args.calibration_batches} fits projected pretrained matrices, "
                              "but this model trains from scratch: give --model_name_or_path, or leave the flag out")
    if args.compare_dense_steps:
        if args.compare_dense_steps < 0:
            raise RecipeError(f"--compare_dense_steps {args.compare_dense_steps} is negative: give a few dozen steps, "
                              "e.g. 20, or 0 for no comparison")
        if args.dense:
            raise RecipeError("--compare_dense_steps times the dense model beside a Pixelfly run: leave out --dense")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise RecipeError("--compare_dense_steps times one process: launch with --num_processes 1, or leave "
                              "the flag out")
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
