"""What a training script does around get_model: the calibration batches, a plan that does not fit the model as one
RecipeError line, and the printed plan. The script calls get_model itself, so that a planner warning (a rank
lowered) names the script's line, not one inside pixelfly_hf."""
import itertools
from contextlib import contextmanager

from .errors import RecipeError


def calibration_batches(train_dataloader, args):
    """get_model's calibration_data: the first --calibration_batches training batches, or None (fit the weights).
    A training set with fewer batches gives all it has, and args.calibration_batches becomes that count, which the
    printed plan and all_results.json report."""
    args.calibration_batches = min(args.calibration_batches, len(train_dataloader))
    return itertools.islice(train_dataloader, args.calibration_batches) if args.calibration_batches else None


@contextmanager
def plan_must_fit():
    """get_model's ValueError (the flags plan a layout some matrix cannot take) as one RecipeError line naming the
    flags to adjust."""
    try:
        yield
    except ValueError as error:
        raise RecipeError(f"the Pixelfly flags do not fit this model: {error} (adjust --density, --low_rank, "
                          "--pixelfly_block_size or --target_modules)") from None


def print_plan(model, accelerator, args):
    """On the main process, print the sparsity summary and, for a projected model, which fit it made and its error;
    return the summary (None on the other processes)."""
    if not accelerator.is_main_process:
        return None
    summary = model.print_sparsity_summary()
    errors = [row["projection_error"] for row in summary["layers"] if row["projection_error"] is not None]
    if errors:
        fitted = f"its outputs on {args.calibration_batches} training batches" if args.calibration_batches \
            else "its weights"
        print(f"projected: each matrix fitted to {fitted}, relative error {sum(errors) / len(errors):.3f} on "
              f"average, {max(errors):.3f} at most", flush=True)
    return summary
