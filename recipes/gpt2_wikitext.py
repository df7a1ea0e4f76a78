"""Train a Pixelfly GPT-2 on the shipped Shakespeare, WikiText-103 or your text files, with accelerate.

    python recipes/gpt2_wikitext.py        # offline default: shipped Shakespeare, tiny GPT-2 on CPU (small on GPU)
    accelerate launch recipes/gpt2_wikitext.py --dataset_name Salesforce/wikitext   # WikiText-103
    accelerate launch recipes/gpt2_wikitext.py --model_name_or_path openai-community/gpt2   # sparsify + fine-tune
    accelerate launch recipes/gpt2_wikitext.py --train_file my.txt --validation_file my_val.txt

Add --dense for the same run without Pixelfly. Mixed precision and the number of processes / GPUs
come from `accelerate launch` (e.g. --mixed_precision bf16) or its config file. See recipes/README.md.
"""
import logging
from itertools import chain
from pathlib import Path

import evaluate
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from datasets import load_dataset
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, default_data_collator

from pixelfly_hf import get_model
from pixelfly_hf.training import (ArgumentParser, RecipeError, TrainingLoop, add_pixelfly_args, add_training_args,
                                  announce, calibration_batches, check_args, check_column, check_data_file,
                                  check_model_folder, finish, hub_access, init_tracking, limit_samples,
                                  load_model_config, make_accelerator, make_optimizer, make_scheduler,
                                  make_train_dataloader, plan_must_fit, print_plan, resolve_defaults, run_main,
                                  time_dense_steps)

# name: (n_layer, n_embd, n_head, Pixelfly minimum tile, default lr, default sequence length)
MODEL_SIZES = {
    "tiny": dict(n_layer=4, n_embd=256, n_head=4, block_size=16, lr=2e-3, seq_len=64),
    "small": dict(n_layer=12, n_embd=768, n_head=12, block_size=32, lr=6e-4, seq_len=1024),
    "medium": dict(n_layer=24, n_embd=1024, n_head=16, block_size=32, lr=3e-4, seq_len=1024),
    "large": dict(n_layer=36, n_embd=1280, n_head=20, block_size=32, lr=2.5e-4, seq_len=1024),
}
RECIPES = Path(__file__).resolve().parent
METRICS = RECIPES / "metrics"  # evaluate modules that load offline (evaluate.load("accuracy") fetches from the Hub)
SHIPPED_TOKENIZER = RECIPES / "data" / "gpt2_tokenizer"
SHIPPED_TEXT = RECIPES / "data" / "shakespeare"
SHIPPED_STEPS = 200  # the offline default's length: 2 min on 2 CPU cores
DATASET_CONFIGS = {"Salesforce/wikitext": "wikitext-103-raw-v1"}
TEXT_FILES = {"txt": "text", "csv": "csv", "json": "json", "jsonl": "json", "parquet": "parquet"}
OFFLINE = "leave out --dataset_name to train on the shipped Shakespeare, or give --train_file"


def parse_args(argv=None):
    parser = ArgumentParser(__doc__)
    g = parser.add_argument_group("data")
    g.add_argument("--dataset_name", help="a Hub dataset, e.g. Salesforce/wikitext (default: the shipped Shakespeare "
                                          "in recipes/data/shakespeare)")
    g.add_argument("--dataset_config_name", help="default: wikitext-103-raw-v1 for Salesforce/wikitext")
    g.add_argument("--train_file", help="a .txt / .csv / .json(l) / .parquet file (or glob) of training text")
    g.add_argument("--validation_file", help="held-out text; without it, --validation_split_percentage of train")
    g.add_argument("--validation_split_percentage", type=int, default=5,
                   help="percent of the training text held out when no validation text is given")
    g.add_argument("--text_column_name", default="text", help="the column of csv / json / parquet files")
    g.add_argument("--seq_len", "--block_size", dest="seq_len", type=int, default=None,
                   help="tokens per training sequence (--block_size is run_clm's name); default: the preset's")
    g = parser.add_argument_group("model")
    g.add_argument("--model_size", choices=sorted(MODEL_SIZES), default=None,
                   help="GPT-2 preset trained from scratch (default: small on a GPU, tiny on CPU)")
    g.add_argument("--model_name_or_path", help="a pretrained GPT-2 (Hub id or folder) to sparsify and fine-tune")
    g.add_argument("--tokenizer_name", default=None,
                   help="default: the model's own, or the GPT-2 tokenizer shipped in recipes/data/")
    g.add_argument("--dropout", type=float, default=0.1, help="GPT-2 residual/embedding/attention dropout")
    add_pixelfly_args(parser, block_size=None)
    add_training_args(parser, output_dir=None, batch_size=8, epochs=1,
                      shipped={"max_train_steps": SHIPPED_STEPS})
    args = parser.parse_args(argv)
    args.model_size = args.model_size or ("small" if torch.cuda.is_available() else "tiny")
    resolve_defaults(args, MODEL_SIZES[args.model_size], family="gpt2", finetune_lr=1e-4)
    if args.validation_file and not args.train_file:
        raise RecipeError("--validation_file needs --train_file too")
    if not args.train_file and not args.dataset_name:
        args.train_file, args.validation_file = str(SHIPPED_TEXT / "train.txt"), str(SHIPPED_TEXT / "validation.txt")
        if args.max_train_steps is None and args.num_train_epochs is None:
            args.max_train_steps = SHIPPED_STEPS
    if args.dataset_name and args.dataset_config_name is None:
        args.dataset_config_name = DATASET_CONFIGS.get(args.dataset_name)
    check_args(args, pretrained=bool(args.model_name_or_path))
    if args.model_name_or_path:
        check_model_folder(args.model_name_or_path, "--model_name_or_path", "gpt2")
    if args.tokenizer_name:
        check_model_folder(args.tokenizer_name, "--tokenizer_name", "gpt2", weights=False)
    for flag in ("train_file", "validation_file"):
        if getattr(args, flag):
            check_data_file(getattr(args, flag), f"--{flag}", TEXT_FILES)
    return args


def load_text(args):
    if args.train_file:
        files = {"train": args.train_file}
        if args.validation_file:
            files["validation"] = args.validation_file
        builder = TEXT_FILES[Path(args.train_file).suffix.lstrip(".")]
        kwargs = {"keep_linebreaks": True} if builder == "text" else {}
        raw = load_dataset(builder, data_files=files, **kwargs)
    else:
        with hub_access("--dataset_name", args.dataset_name, OFFLINE):
            raw = load_dataset(args.dataset_name, args.dataset_config_name)
    if "validation" not in raw:
        split = raw["train"].train_test_split(test_size=args.validation_split_percentage / 100, seed=args.seed)
        raw["train"], raw["validation"] = split["train"], split["test"]
    for name in ("train", "validation"):
        check_column(raw[name], args.text_column_name, "--text_column_name")
    return raw


def count_tokens(batch):
    return batch["input_ids"].numel()


def tokenize_and_group(raw, tokenizer, seq_len, args):
    logging.getLogger("transformers.tokenization_utils_base").setLevel(logging.ERROR)  # long-text warning
    tokenized = raw.map(lambda ex: tokenizer(ex[args.text_column_name]), batched=True,
                        num_proc=args.preprocessing_num_workers, remove_columns=raw["train"].column_names,
                        desc="tokenizing")

    def group_texts(examples):
        joined = {k: list(chain(*examples[k])) for k in examples}
        total = (len(joined["input_ids"]) // seq_len) * seq_len
        blocks = {k: [v[i:i + seq_len] for i in range(0, total, seq_len)] for k, v in joined.items()}
        blocks["labels"] = [b[:] for b in blocks["input_ids"]]
        return blocks

    return tokenized.map(group_texts, batched=True, num_proc=args.preprocessing_num_workers,
                         desc=f"grouping into blocks of {seq_len}")


def main(argv=None):
    args = parse_args(argv)
    shipped = args.train_file == str(SHIPPED_TEXT / "train.txt")
    announce(f"gpt2_wikitext.py: training {args.model_name_or_path or f'a {args.model_size} GPT-2 from scratch'}"
             f"{' (dense)' if args.dense else ' as Pixelfly'} on "
             f"{'the shipped Shakespeare' if shipped else args.dataset_name or args.train_file} "
             f"({'GPU' if torch.cuda.is_available() else 'CPU'})"
             + ("; the offline default: --dataset_name Salesforce/wikitext for WikiText-103" if shipped else ""))
    accelerator = make_accelerator(args, fixed_shapes=True)
    set_seed(args.seed)

    # Model config first: it is cheap and lets bad flags fail before any data (or a wrong model's tokenizer) is read.
    if args.model_name_or_path:
        config = load_model_config(args.model_name_or_path, "gpt2")
    tokenizer_name = args.tokenizer_name or args.model_name_or_path or SHIPPED_TOKENIZER
    with hub_access("--tokenizer_name" if args.tokenizer_name else "--model_name_or_path", str(tokenizer_name),
                    "give a local folder"):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name)
    if not args.model_name_or_path:
        preset = MODEL_SIZES[args.model_size]
        config = GPT2Config(vocab_size=len(tokenizer), n_positions=1024, n_layer=preset["n_layer"],
                            n_embd=preset["n_embd"], n_head=preset["n_head"], resid_pdrop=args.dropout,
                            embd_pdrop=args.dropout, attn_pdrop=args.dropout,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    seq_len = args.seq_len or min(MODEL_SIZES[args.model_size]["seq_len"], config.n_positions)
    if not 2 <= seq_len <= config.n_positions:
        raise RecipeError(f"--seq_len {seq_len} does not fit the model: it has {config.n_positions} "
                          f"positions (n_positions). Use --seq_len between 2 and {config.n_positions}.")

    # Data: tokenize, concatenate, cut into seq_len blocks (labels = inputs; the model shifts them).
    with accelerator.main_process_first():
        lm = tokenize_and_group(load_text(args), tokenizer, seq_len, args)
    train_set, eval_set = lm["train"], lm["validation"]
    train_set, eval_set = limit_samples(args, train_set, eval_set)
    if len(eval_set) == 0:
        raise RecipeError(f"the validation text is shorter than one block of {seq_len} tokens: "
                          "give more validation text or a smaller --seq_len")
    train_dataloader = make_train_dataloader(train_set, args, default_data_collator)
    eval_dataloader = DataLoader(eval_set, collate_fn=default_data_collator,
                                 batch_size=args.per_device_eval_batch_size)

    # Model, then Pixelfly (before prepare, so DDP/FSDP wrap the sparse parameters).
    if args.model_name_or_path:
        with hub_access("--model_name_or_path", args.model_name_or_path, "give a local model folder"):
            model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path)
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
    else:
        model = AutoModelForCausalLM.from_config(config)
    # GPT2LMHeadModel's class name maps to no loss type: name it, or transformers warns on every forward
    # (and torch.compile breaks the graph there)
    model.loss_type = "ForCausalLM"
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
    init_tracking(accelerator, args, "gpt2_pixelfly")

    def evaluate_perplexity(model):
        model.eval()
        metric = evaluate.load(str(METRICS / "perplexity"), keep_in_memory=True)
        for batch in eval_dataloader:
            with torch.no_grad():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                                  reduction="none").view_as(labels)
            mask = labels != -100
            nll_sum, num_tokens = accelerator.gather_for_metrics(((nll * mask).sum(1).double(), mask.sum(1)))
            metric.add_batch(nll_sum=nll_sum.tolist(), num_tokens=num_tokens.tolist())
        return metric.compute()

    model, result = TrainingLoop(accelerator, args, model, optimizer, lr_scheduler, train_dataloader,
                                 evaluate_perplexity, count_fn=count_tokens,
                                 unit="tokens").run()

    finish(accelerator, args, model, result, sparsity, processor=tokenizer, recipe="gpt2_wikitext.py",
           base=f"GPT-2 ({args.model_name_or_path or args.model_size + ' preset, from scratch'})",
           dataset=args.train_file or f"{args.dataset_name} ({args.dataset_config_name})",
           model_class="AutoModelForCausalLM", metric="perplexity", tags=["gpt2", "text-generation"],
           extra={"seq_len": seq_len}, dense_rate=dense_rate)
    return result


if __name__ == "__main__":
    run_main(main)
