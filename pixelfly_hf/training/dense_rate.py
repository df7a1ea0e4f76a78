"""--compare_dense_steps: the rate the same model trains at dense, timed in the same process just before the Pixelfly
run (same batches, precision, compile mode, AdamW and clipping), so a user sees on their own machine what Pixelfly
buys."""
import copy
import itertools
import time

import torch
from accelerate.utils import DynamoBackend

from .optimizer import make_optimizer

WARMUP_STEPS = 3  # untimed: the compile, then the CUDA graphs' recording


def synchronize(device):
    """Wait for the work queued on `device` (a GPU runs behind the Python that launched it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_dense_steps(model, accelerator, args, train_dataloader, count_fn):
    """Units per second over args.compare_dense_steps optimizer steps of a copy of `model` (dense, before get_model;
    the copy is trained and discarded), after WARMUP_STEPS untimed ones. The random number generators are restored
    afterwards, so the run that follows is the one it would have been without the comparison."""
    device = accelerator.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model = copy.deepcopy(model).to(device).train()
        optimizer = make_optimizer(model, args, device)
        plugin = accelerator.state.dynamo_plugin
        step_model = torch.compile(model, **plugin.to_kwargs()) if plugin.backend != DynamoBackend.NO else model
        batches = itertools.cycle(train_dataloader)
        units = 0
        for step in range(WARMUP_STEPS + args.compare_dense_steps):
            if step == WARMUP_STEPS:
                synchronize(device)
                start, units = time.perf_counter(), 0
            batch = {k: v.to(device) for k, v in next(batches).items()}
            with accelerator.autocast():
                loss = step_model(**batch).loss
            loss.backward()
            if args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
            units += count_fn(batch)
        synchronize(device)
        seconds = time.perf_counter() - start
    del model, step_model, optimizer
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return units / seconds
