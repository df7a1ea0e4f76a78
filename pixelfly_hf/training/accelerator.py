"""The Accelerator a training script runs under: mixed precision, distribution and CPU use from `accelerate launch`,
compilation from --torch_compile, a data order that depends only on (seed, epoch); and printing on rank 0 before the
Accelerator exists."""
import os

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DynamoBackend, TorchDynamoPlugin


def is_main_process():
    """Rank 0 of a launch (before the Accelerator exists): only it prints the run's first line."""
    return int(os.environ.get("RANK", "0")) == 0


def announce(line):
    """The run's first line: what trains on what."""
    if is_main_process():
        print(line, flush=True)


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
    return Accelerator(
        dynamo_plugin=plugin,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to if args.with_tracking else None,
        project_dir=args.output_dir,
        # The shuffle order is a function of (seed, epoch) only, so a resumed run sees the same batches.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
