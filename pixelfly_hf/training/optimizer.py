"""AdamW and its learning-rate schedule over the run's optimizer steps."""
import math

import torch
from transformers import get_scheduler

from .errors import RecipeError


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
    """Fill in max_train_steps / num_train_epochs from the dataloader's length per process."""
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
