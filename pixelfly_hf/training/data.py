"""The training script's data plumbing shared by every model: truncated splits and the training DataLoader."""
from torch.utils.data import DataLoader


def limit_samples(args, train_set, eval_set):
    """The first --max_train_samples / --max_eval_samples examples of each split (all without the flag)."""
    if args.max_train_samples is not None:
        train_set = train_set.select(range(min(args.max_train_samples, len(train_set))))
    if args.max_eval_samples is not None:
        eval_set = eval_set.select(range(min(args.max_eval_samples, len(eval_set))))
    return train_set, eval_set


def make_train_dataloader(train_set, args, collate_fn):
    """Shuffled training batches, without the short last batch: under torch.compile (accelerate's
    --dynamo_backend) its new shape recompiles the model at every epoch end (27-46 s each for GPT-2 small on
    an H200, docs/dev/benchmarks-log.md)."""
    return DataLoader(train_set, shuffle=True, collate_fn=collate_fn, batch_size=args.per_device_train_batch_size,
                      drop_last=True)
