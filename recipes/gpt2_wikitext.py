"""Train a Pixelfly GPT-2 on WikiText-103 (or your text files) with accelerate.

    accelerate launch recipes/gpt2_wikitext.py --model_size small            # WikiText-103, from scratch
    accelerate launch recipes/gpt2_wikitext.py --model_name_or_path gpt2     # sparsify + fine-tune GPT-2
    accelerate launch recipes/gpt2_wikitext.py --model_size tiny \\
        --train_file recipes/data/shakespeare/train.txt \\
        --validation_file recipes/data/shakespeare/validation.txt            # offline demo, CPU minutes

Add --dense for the same run without Pixelfly. Mixed precision and the number of processes / GPUs
come from `accelerate launch` (e.g. --mixed_precision bf16) or its config file. See recipes/README.md.
"""
import argparse
import glob
import logging
import sys
from itertools import chain
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from datasets import load_dataset
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GPT2Config, default_data_collator

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# name: (n_layer, n_embd, n_head, Pixelfly minimum tile, default lr, default sequence length)
MODEL_SIZES = {
    "tiny": dict(n_layer=2, n_embd=128, n_head=4, block_size=16, lr=2e-3, seq_len=64),
    "small": dict(n_layer=12, n_embd=768, n_head=12, block_size=32, lr=6e-4, seq_len=1024),
    "medium": dict(n_layer=24, n_embd=1024, n_head=16, block_size=32, lr=3e-4, seq_len=1024),
    "large": dict(n_layer=36, n_embd=1280, n_head=20, block_size=32, lr=2.5e-4, seq_len=1024),
}
SHIPPED_TOKENIZER = common.DATA_DIR / "gpt2_tokenizer"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("data")
    g.add_argument("--dataset_name", default="Salesforce/wikitext", help="a Hub dataset (ignored with --train_file)")
    g.add_argument("--dataset_config_name", default="wikitext-103-raw-v1")
    g.add_argument("--train_file", help="a .txt / .csv / .json(l) / .parquet file (or glob) of training text")
    g.add_argument("--validation_file", help="held-out text; without it, --validation_split_percentage of train")
    g.add_argument("--validation_split_percentage", type=int, default=5)
    g.add_argument("--text_column_name", default="text")
    g.add_argument("--seq_len", type=int, default=None,
                   help="tokens per training sequence (run_clm's --block_size); default: the preset's")
    g = parser.add_argument_group("model")
    g.add_argument("--model_size", choices=sorted(MODEL_SIZES), default="small",
                   help="GPT-2 preset trained from scratch")
    g.add_argument("--model_name_or_path", help="a pretrained GPT-2 (Hub id or folder) to sparsify and fine-tune")
    g.add_argument("--tokenizer_name", default=None,
                   help="default: the model's own, or the GPT-2 tokenizer shipped in recipes/data/")
    g.add_argument("--dropout", type=float, default=0.1, help="GPT-2 residual/embedding/attention dropout")
    common.add_pixelfly_args(parser, block_size=None)
    common.add_training_args(parser, output_dir=None, batch_size=8, epochs=1)
    args = parser.parse_args(argv)
    common.resolve_defaults(args, MODEL_SIZES[args.model_size], family="gpt2", finetune_lr=1e-4)
    if args.validation_file and not args.train_file:
        raise common.RecipeError("--validation_file needs --train_file too")
    common.check_args(args)
    return args


def load_text(args):
    if args.train_file:
        files = {"train": args.train_file}
        if args.validation_file:
            files["validation"] = args.validation_file
        for f in files.values():
            if not glob.glob(f):
                raise common.RecipeError(f"data file {f} does not exist (a path or a glob pattern)")
        ext = Path(args.train_file).suffix.lstrip(".")
        builder = {"txt": "text", "jsonl": "json"}.get(ext, ext)
        kwargs = {"keep_linebreaks": True} if builder == "text" else {}
        raw = load_dataset(builder, data_files=files, **kwargs)
    else:
        raw = load_dataset(args.dataset_name, args.dataset_config_name)
    if "validation" not in raw:
        split = raw["train"].train_test_split(test_size=args.validation_split_percentage / 100, seed=args.seed)
        raw["train"], raw["validation"] = split["train"], split["test"]
    for name in ("train", "validation"):
        common.check_column(raw[name], args.text_column_name, "--text_column_name")
    return raw


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
    accelerator = common.make_accelerator(args)
    set_seed(args.seed)

    # Model config first: it is cheap and lets bad flags fail before any data is read.
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name or args.model_name_or_path or SHIPPED_TOKENIZER)
    if args.model_name_or_path:
        config = AutoConfig.from_pretrained(args.model_name_or_path)
        if config.model_type != "gpt2":
            raise common.RecipeError(f"--model_name_or_path {args.model_name_or_path} is a {config.model_type!r} "
                                     "model; this recipe sparsifies GPT-2 checkpoints (model_type 'gpt2')")
    else:
        preset = MODEL_SIZES[args.model_size]
        config = GPT2Config(vocab_size=len(tokenizer), n_positions=1024, n_layer=preset["n_layer"],
                            n_embd=preset["n_embd"], n_head=preset["n_head"], resid_pdrop=args.dropout,
                            embd_pdrop=args.dropout, attn_pdrop=args.dropout,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    seq_len = args.seq_len or min(MODEL_SIZES[args.model_size]["seq_len"], config.n_positions)
    if not 2 <= seq_len <= config.n_positions:
        raise common.RecipeError(f"--seq_len {seq_len} does not fit the model: it has {config.n_positions} "
                                 f"positions (n_positions). Use --seq_len between 2 and {config.n_positions}.")

    # Data: tokenize, concatenate, cut into seq_len blocks (labels = inputs; the model shifts them).
    with accelerator.main_process_first():
        lm = tokenize_and_group(load_text(args), tokenizer, seq_len, args)
    train_set, eval_set = lm["train"], lm["validation"]
    train_set, eval_set = common.limit_samples(args, train_set, eval_set)
    if len(eval_set) == 0:
        raise common.RecipeError(f"the validation text is shorter than one block of {seq_len} tokens: "
                                 "give more validation text or a smaller --seq_len")
    train_dataloader = common.make_train_dataloader(train_set, args, default_data_collator)
    eval_dataloader = DataLoader(eval_set, collate_fn=default_data_collator,
                                 batch_size=args.per_device_eval_batch_size)

    # Model, then Pixelfly (before prepare, so DDP/FSDP wrap the sparse parameters).
    if args.model_name_or_path:
        model = AutoModelForCausalLM.from_pretrained(args.model_name_or_path)
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
    else:
        model = AutoModelForCausalLM.from_config(config)
    # GPT2LMHeadModel's class name maps to no loss type: name it, or transformers warns on every forward
    # (and torch.compile breaks the graph there)
    model.loss_type = "ForCausalLM"
    model, sparsity = common.apply_pixelfly(model, args, accelerator, pretrained=bool(args.model_name_or_path))

    optimizer = common.make_optimizer(model, args, accelerator.device)
    lr_scheduler = common.make_scheduler(optimizer, args, accelerator, train_dataloader)
    model, optimizer, train_dataloader, eval_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader, lr_scheduler)
    common.init_tracking(accelerator, args, "gpt2_pixelfly")

    def evaluate_perplexity(model):
        model.eval()
        metric = common.load_metric("perplexity")
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

    result = common.fit(accelerator, args, model, optimizer, lr_scheduler, train_dataloader,
                        evaluate_perplexity, count_fn=lambda batch: batch["input_ids"].numel(), unit="tokens")

    common.save_model(accelerator, model, args, tokenizer)
    if accelerator.is_main_process:
        results = common.write_results(args, result, sparsity, {"seq_len": seq_len})
        base = f"GPT-2 ({args.model_name_or_path or args.model_size + ' preset, from scratch'})"
        dataset = args.train_file or f"{args.dataset_name} ({args.dataset_config_name})"
        common.write_model_card(args, recipe="gpt2_wikitext.py", title=Path(args.output_dir).name, base=base,
                                dataset=dataset, model_class="AutoModelForCausalLM", results=results,
                                sparsity=sparsity, tags=["gpt2", "text-generation"])
        common.print_before_after(result, "perplexity", ".2f")
        print(f"throughput: {result['throughput']:,.0f} tokens/s over {result['train_seconds']:.1f} s of training")
        common.print_load_hint(args, "AutoModelForCausalLM", "AutoTokenizer")
    common.push_to_hub(accelerator, args, "End of training")
    return result


if __name__ == "__main__":
    common.run(main)
