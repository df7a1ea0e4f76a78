"""The training loop of transformers' *_no_trainer.py scripts, with exact resume, a time budget and the switch to
dense: a class whose attributes are the run's state and whose methods are the loop's steps (train an epoch, log a
window, switch to dense, evaluate, checkpoint, resume). The pieces another loop may reuse are objects of their own:
TimeBudget, DensifySchedule and densify, TrainLog, the checkpoint functions."""
import itertools
from dataclasses import dataclass

import torch
from accelerate.logging import get_logger
from tqdm.auto import tqdm

from .checkpoints import find_checkpoint, read_checkpoint_state, save_checkpoint
from .dense_rate import synchronize
from .densify import DensifySchedule, densify
from .optimizer import plan_steps
from .time_budget import TimeBudget
from .train_log import TrainLog

logger = get_logger(__name__)

# where a run without a checkpoint starts
FRESH_START = {"completed_steps": 0, "epoch": 0, "batches_in_epoch": 0, "train_seconds": 0.0, "units_seen": 0}


@dataclass
class Window:
    """The optimizer steps since the last train record: summed loss over its micro-batches (a tensor on the model's
    device once one is added: no sync per step), this process's units (tokens, images) and the training seconds."""

    loss: float = 0.0
    micro_batches: int = 0
    units: int = 0
    seconds: float = 0.0

    def reduce(self, accelerator, flags):
        """(mean loss, units, flags) over all processes, in one reduction: the loss averaged, the units and the
        0/1 `flags` summed (a flag raised on any process is raised on all)."""
        counts = torch.tensor([self.units, *flags], dtype=torch.float64, device=accelerator.device)
        local = torch.cat([(self.loss / self.micro_batches).reshape(1), counts])  # the loss stays on its device
        total = accelerator.reduce(local, reduction="sum").tolist()
        return total[0] / accelerator.num_processes, int(total[1]), [flag > 0 for flag in total[2:]]


def format_metrics(metrics):
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


class TrainingLoop:
    """TrainingLoop(...).run() trains the prepared model for args.max_train_steps (or args.num_train_epochs, or
    until --max_train_minutes), evaluating before, every --eval_steps and after, and returns (model, result): the
    model trained last (the dense one after --densify_at) and {"initial_eval", "final_eval", "completed_steps",
    "train_seconds", "stopped_by", "throughput", "steady_throughput" (after the first logged window, which holds the
    compile and the kernel tuning; None before a second window), "unit", "densified_at"}.

    evaluate_fn(model) -> dict of metrics (computed with gather_for_metrics, the same on every process).
    count_fn(batch) -> the number of `unit`s (tokens, images, ...) in this process's batch, for throughput.
    Every eval record in the log also carries train/seconds and train/<unit> so far (loss-vs-time plots).
    """

    def __init__(self, accelerator, args, model, optimizer, lr_scheduler, train_dataloader, evaluate_fn, count_fn,
                 unit="tokens"):
        self.accelerator, self.args = accelerator, args
        self.model, self.optimizer, self.lr_scheduler = model, optimizer, lr_scheduler
        self.train_dataloader = train_dataloader
        self.evaluate_fn, self.count_fn, self.unit = evaluate_fn, count_fn, unit
        plan_steps(args, len(train_dataloader))  # the prepared loader's length, per process
        self.resume_dir = find_checkpoint(args)  # None once its states are loaded
        self.start = read_checkpoint_state(self.resume_dir) if self.resume_dir is not None else FRESH_START
        self.completed_steps = self.start["completed_steps"]
        # train/seconds and train/<unit> count from the first step, across resumes
        self.budget = TimeBudget(args.max_train_minutes, spent=self.start["train_seconds"])
        self.logged_seconds, self.logged_units = self.start["train_seconds"], self.start["units_seen"]
        self.window = Window()
        self.steady = Window()  # the windows after the first, which holds the compile and the kernel tuning
        self.densify_schedule = DensifySchedule(args.densify_at, args.max_train_steps, self.budget)
        self.densified_at = None  # the step of the switch to dense
        self.stopped_by = "steps"
        self.progress = None
        total_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
        logger.info(f"***** Running training ***** examples/epoch = {len(train_dataloader.dataset)}, "
                    f"epochs = {args.num_train_epochs}, total batch = {total_batch}, "
                    f"optimizer steps = {args.max_train_steps}", main_process_only=True)
        self.log = TrainLog(accelerator, args, self.completed_steps if self.resume_dir is not None else None)

    @property
    def finished(self):
        return self.completed_steps >= self.args.max_train_steps or self.stopped_by == "time"

    def run(self):
        initial_eval = None
        if self.resume_dir is None:
            initial_eval = self.evaluate("before training")
        elif self.finished:
            self.resume()  # already finished: just reload
        self.progress = tqdm(range(self.args.max_train_steps), initial=self.completed_steps,
                             disable=not self.accelerator.is_local_main_process)
        for epoch in range(self.start["epoch"], self.args.num_train_epochs):
            if self.finished:
                break
            self.train_epoch(epoch)
        self.progress.close()
        final_eval = self.evaluate(f"after training ({self.completed_steps} steps, stopped by {self.stopped_by})")
        if self.args.with_tracking:
            self.accelerator.end_training()
        return self.model, {"initial_eval": initial_eval, "final_eval": final_eval,
                            "completed_steps": self.completed_steps, "train_seconds": self.logged_seconds,
                            "stopped_by": self.stopped_by,
                            "throughput": self.logged_units / self.logged_seconds if self.logged_seconds else None,
                            "steady_throughput": self.steady.units / self.steady.seconds if self.steady.seconds
                            else None,
                            "unit": self.unit, "densified_at": self.densified_at}

    def train_epoch(self, epoch):
        args, accelerator = self.args, self.accelerator
        self.model.train()
        skip = self.start["batches_in_epoch"] if self.resume_dir is not None and epoch == self.start["epoch"] else 0
        loader = accelerator.skip_first_batches(self.train_dataloader, skip) if skip else self.train_dataloader
        loader.set_epoch(epoch)
        batches = iter(loader)
        first = next(batches, None)
        if self.resume_dir is not None:
            # Restore model/optimizer/scheduler/RNG only now: starting the data iterator above draws from
            # the global RNG, which the uninterrupted run did before the checkpoint was written.
            self.resume()
        batches_in_epoch = skip
        self.budget.start()
        for batch in itertools.chain([first], batches) if first is not None else ():
            self.train_batch(batch)
            batches_in_epoch += 1
            if not accelerator.sync_gradients:
                continue
            if self.pauses_after_step(batches_in_epoch):
                synchronize(accelerator.device)  # this step's GPU work belongs inside the clock
            self.window.seconds += self.budget.stop()
            self.end_step(epoch, batches_in_epoch)
            if self.finished:
                break
            self.budget.start()
        if args.checkpointing_steps == "epoch":
            # a run stopped by steps or time (the loop broke off) records where it stopped, so a resume (say,
            # with more time) continues inside this epoch instead of skipping its remaining batches
            if self.finished:
                self.save(f"epoch_{epoch}", epoch=epoch, batches_in_epoch=batches_in_epoch)
            else:
                self.save(f"epoch_{epoch}", epoch=epoch + 1, batches_in_epoch=0)

    def train_batch(self, batch):
        """Forward and backward of one micro-batch; an optimizer step where gradient accumulation ends."""
        accelerator = self.accelerator
        with accelerator.accumulate(self.model):
            loss = self.model(**batch).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients and self.args.max_grad_norm > 0:
                accelerator.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad()
        self.window.loss += loss.detach().double()
        self.window.micro_batches += 1
        self.window.units += self.count_fn(batch)

    def pauses_after_step(self, batches_in_epoch):
        """Whether untimed work (a log, an evaluation, a checkpoint, the switch to dense, the end of an epoch) follows
        the optimizer step just taken. Only then does the clock wait for the GPU: elsewhere the next step's batch
        copy waits for it, inside the clock, and Python keeps launching ahead of the GPU."""
        args, step = self.args, self.completed_steps + 1
        every = args.checkpointing_steps
        return (step % args.logging_steps == 0 or step >= args.max_train_steps or step == self.densify_schedule.step
                or bool(args.eval_steps) and step % args.eval_steps == 0
                or every not in (None, "epoch") and step % int(every) == 0
                or batches_in_epoch == len(self.train_dataloader))

    def end_step(self, epoch, batches_in_epoch):
        """After an optimizer step: count it; log, switch to dense, evaluate and checkpoint where due."""
        args = self.args
        self.completed_steps += 1
        self.progress.update(1)
        densify_now = self.completed_steps == self.densify_schedule.step
        if self.completed_steps % args.logging_steps == 0 or self.completed_steps == args.max_train_steps:
            densify_now = self.log_window(epoch) or densify_now
        if densify_now and self.densified_at is None and self.stopped_by != "time":
            self.switch_to_dense()
        # the last step is evaluated after the loop
        if args.eval_steps and self.completed_steps % args.eval_steps == 0 and not self.finished:
            self.evaluate(f"step {self.completed_steps}")
            self.model.train()
        every = args.checkpointing_steps
        if every not in (None, "epoch") and self.completed_steps % int(every) == 0:
            self.save(f"step_{self.completed_steps}", epoch=epoch, batches_in_epoch=batches_in_epoch)

    def log_window(self, epoch):
        """Write the window's train record (loss and units over all processes) and start a new window. The time
        checks ride on the same reduction, so every process stops (or densifies) at the same step.
        Returns whether the time share of --densify_at has passed."""
        window = self.window
        loss, units, (over_time, densify_time) = window.reduce(
            self.accelerator, [self.budget.exhausted, self.densify_schedule.time_reached(self.budget.spent)])
        if over_time:
            self.stopped_by = "time"
        rate = units / window.seconds
        record = {"train/loss": loss, "train/lr": self.lr_scheduler.get_last_lr()[0],
                  f"train/{self.unit}_per_second": rate, "epoch": epoch}
        self.log.write(record, step=self.completed_steps)
        self.progress.set_postfix(loss=f"{loss:.4f}", **{f"{self.unit}/s": f"{rate:,.0f}"})
        if self.logged_seconds > self.start["train_seconds"]:  # not the run's first window
            self.steady.units += units
            self.steady.seconds += window.seconds
        self.logged_seconds += window.seconds
        self.logged_units += units
        self.window = Window()
        return densify_time

    def switch_to_dense(self):
        """--densify_at: merge into dense matrices and train on. The merge counts as training time: an equal-time
        comparison must pay for it."""
        self.budget.start()
        self.model, self.optimizer, self.lr_scheduler = densify(self.accelerator, self.model, self.optimizer,
                                                                self.lr_scheduler, self.args)
        self.densified_at = self.completed_steps
        self.model.train()
        self.window.seconds += self.budget.stop()
        self.accelerator.print(f"step {self.completed_steps}: merged the Pixelfly matrices into dense ones "
                               f"(--densify_at {self.args.densify_at}); training on dense")

    def seen(self):
        """Training seconds and units so far, the open window included."""
        return self.budget.spent, self.logged_units + self.window.units * self.accelerator.num_processes

    def evaluate(self, when):
        """evaluate_fn's metrics, printed after `when` and logged with the training seconds and units so far."""
        metrics = self.evaluate_fn(self.model)
        self.accelerator.print(f"{when}: {format_metrics(metrics)}")
        seconds, units = self.seen()
        self.log.write({**{f"eval/{k}": v for k, v in metrics.items()}, "train/seconds": seconds,
                        f"train/{self.unit}": units}, step=self.completed_steps)
        return metrics

    def save(self, name, *, epoch, batches_in_epoch):
        """A checkpoint in output_dir/name, with where to continue: the epoch and its batches already trained."""
        seconds, units = self.seen()
        save_checkpoint(self.accelerator, self.args.output_dir, name, {
            "completed_steps": self.completed_steps, "epoch": epoch, "batches_in_epoch": batches_in_epoch,
            "train_seconds": seconds, "units_seen": units, "densified": self.densified_at is not None,
            "densified_at": self.densified_at})

    def resume(self):
        """Load the checkpoint's model, optimizer, scheduler and RNG states, switching to dense first when the
        checkpoint was written after the switch."""
        if self.start.get("densified") and self.densified_at is None:
            self.model, self.optimizer, self.lr_scheduler = densify(self.accelerator, self.model, self.optimizer,
                                                                    self.lr_scheduler, self.args)
            # checkpoints written before densified_at was recorded switched at the step fraction
            self.densified_at = self.start.get("densified_at", self.densify_schedule.step)
        self.accelerator.load_state(str(self.resume_dir))
        self.accelerator.print(f"resumed from {self.resume_dir} at step {self.start['completed_steps']}")
        self.resume_dir = None
