"""Sparse, then dense (--densify_at): when to switch, and the switch itself, which merges the prepared Pixelfly model
into its stock dense model and carries the optimizer and the learning-rate schedule over."""
import math

from .optimizer import lr_schedule, make_optimizer


class DensifySchedule:
    """The switch comes at the fraction `densify_at` of the optimizer steps, or of the time budget (a TimeBudget),
    whichever is reached first; never without densify_at."""

    def __init__(self, densify_at, max_train_steps, budget):
        self.step, self.seconds = None, math.inf
        if densify_at is not None:
            # after at least one step, and with at least one step left to train dense
            self.step = min(max(round(densify_at * max_train_steps), 1), max_train_steps - 1)
            self.seconds = densify_at * budget.limit

    def time_reached(self, spent):
        return spent >= self.seconds


def densify(accelerator, model, optimizer, lr_scheduler, args):
    """Merge the prepared Pixelfly model into its stock dense model (merge_and_unload) and prepare it again with
    a new optimizer (make_optimizer and lr_schedule of `args`). AdamW state carries over, keyed by parameter name,
    for every parameter whose name and shape the merge keeps (embeddings, norms, biases); the merged dense weights
    start with fresh moments. The new scheduler continues the old one's schedule from its step.
    Returns the prepared (model, optimizer, lr_scheduler)."""
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
