"""Train a Pixelfly ViT on the shipped digits, CIFAR-10 or a local image folder, with accelerate.

    python recipes/vit_cifar.py          # offline default: shipped 8x8 digits, tiny ViT on CPU (small on GPU)
    accelerate launch recipes/vit_cifar.py --dataset_name uoft-cs/cifar10        # CIFAR-10, from scratch
    accelerate launch recipes/vit_cifar.py --model_name_or_path google/vit-base-patch16-224-in21k
    accelerate launch recipes/vit_cifar.py --model_size tiny --train_dir my_images/train \\
        --validation_dir my_images/val                                           # imagefolder layout

Augmentation: random crop (padding 1/8 of the side, reflected) + horizontal flip; images are
normalised with the model's mean/std. Reports accuracy. See recipes/README.md.
"""
import gzip
from pathlib import Path

import evaluate
import numpy as np
import torch
from accelerate.utils import set_seed
from datasets import ClassLabel, Dataset, DatasetDict, load_dataset
from PIL import Image
from torch.utils.data import DataLoader
from transformers import AutoImageProcessor, AutoModelForImageClassification, ViTConfig, ViTImageProcessorPil

from pixelfly_hf import get_model
from pixelfly_hf.training import (ArgumentParser, RecipeError, TrainingLoop, add_pixelfly_args, add_training_args,
                                  announce, calibration_batches, check_args, check_column, check_model_folder, finish,
                                  hub_access, init_tracking, limit_samples, load_model_config, make_accelerator,
                                  make_optimizer, make_scheduler, make_train_dataloader, plan_must_fit, print_plan,
                                  resolve_defaults, run_main, time_dense_steps)

# name: (hidden, layers, heads, Pixelfly minimum tile, default lr, default batch size)
MODEL_SIZES = {
    "tiny": dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, block_size=16, lr=5e-4, batch_size=32),
    "small": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, block_size=32, lr=1e-3,
                  batch_size=128),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, block_size=32, lr=5e-4,
                 batch_size=128),
}
CIFAR_MEAN, CIFAR_STD = [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]
RECIPES = Path(__file__).resolve().parent
METRICS = RECIPES / "metrics"  # evaluate modules that load offline (evaluate.load("accuracy") fetches from the Hub)
SHIPPED_DIGITS = RECIPES / "data" / "digits" / "digits.csv.gz"  # UCI handwritten digits, 1,797 8x8 images
SHIPPED_IMAGE_SIZE = 16  # the 8x8 digits need no more pixels: 16 patches of 4x4, a quarter of CIFAR's 32 px cost
OFFLINE = "leave out --dataset_name to train on the shipped digits, or give --train_dir"


def parse_args(argv=None):
    parser = ArgumentParser(__doc__)
    g = parser.add_argument_group("data")
    g.add_argument("--dataset_name", help="a Hub image dataset, e.g. uoft-cs/cifar10 (default: the shipped digits "
                                          "in recipes/data/digits)")
    g.add_argument("--train_dir", help="a local image folder: <dir>/<class name>/<image files>")
    g.add_argument("--validation_dir", help="the same layout for evaluation; without it, --train_val_split")
    g.add_argument("--train_val_split", type=float, default=0.1,
                   help="fraction of train held out when the dataset has no validation/test split")
    g.add_argument("--image_column_name", default=None, help="default: 'img' if the dataset has it, else 'image'")
    g.add_argument("--label_column_name", default="label", help="the dataset's class column")
    g = parser.add_argument_group("model")
    g.add_argument("--model_size", choices=sorted(MODEL_SIZES), default=None,
                   help="ViT preset from scratch (default: small on a GPU, tiny on CPU)")
    g.add_argument("--model_name_or_path", help="a pretrained ViT (Hub id or folder) to sparsify and fine-tune")
    g.add_argument("--image_size", type=int, default=None,
                   help=f"input side for from-scratch presets (default: 32, or {SHIPPED_IMAGE_SIZE} for the shipped "
                        "8x8 digits)")
    g.add_argument("--patch_size", type=int, default=4, help="patch side for from-scratch presets")
    g.add_argument("--dropout", type=float, default=0.0, help="ViT hidden/attention dropout (from scratch)")
    add_pixelfly_args(parser, block_size=None)
    add_training_args(parser, output_dir=None, batch_size=None, epochs=10)
    args = parser.parse_args(argv)
    args.model_size = args.model_size or ("small" if torch.cuda.is_available() else "tiny")
    resolve_defaults(args, MODEL_SIZES[args.model_size], family="vit", finetune_lr=5e-5)
    if args.image_size is None:
        args.image_size = 32 if args.dataset_name or args.train_dir else SHIPPED_IMAGE_SIZE
    if args.validation_dir and not args.train_dir:
        raise RecipeError("--validation_dir needs --train_dir too")
    if not args.model_name_or_path and args.image_size % args.patch_size:
        raise RecipeError(f"--image_size {args.image_size} is not a multiple of --patch_size "
                          f"{args.patch_size}; pick sizes that tile the image")
    check_args(args, pretrained=bool(args.model_name_or_path))
    if args.model_name_or_path:
        check_model_folder(args.model_name_or_path, "--model_name_or_path", "vit")
    for flag in ("train_dir", "validation_dir"):
        folder = getattr(args, flag)
        if folder and not Path(folder).is_dir():
            raise RecipeError(f"--{flag} {folder}: no such folder; give a folder of <class name>/<image> files")
    return args


def shipped_digits():
    """The shipped digits as one 'train' split of 8x8 grey PIL images (pixel values 0-16, scaled to 0-255)."""
    with gzip.open(SHIPPED_DIGITS, "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    images = [Image.fromarray(pixels.reshape(8, 8) * 15) for pixels in rows[:, :64]]
    features = {"label": ClassLabel(names=[str(d) for d in range(10)])}
    train = Dataset.from_dict({"image": images, "label": rows[:, 64].tolist()})
    return DatasetDict(train=train.cast_column("label", features["label"]))


def load_images(args):
    """Raw datasets with 'train' and 'validation' splits, plus the image column's name."""
    if args.train_dir:
        files = {"train": str(Path(args.train_dir) / "**")}
        if args.validation_dir:
            files["validation"] = str(Path(args.validation_dir) / "**")
        raw = load_dataset("imagefolder", data_files=files)
    elif args.dataset_name:
        with hub_access("--dataset_name", args.dataset_name, OFFLINE):
            raw = load_dataset(args.dataset_name)
    else:
        raw = shipped_digits()
    if "validation" not in raw:
        if "test" in raw:
            raw["validation"] = raw.pop("test")
        else:
            split = raw["train"].train_test_split(test_size=args.train_val_split, seed=args.seed,
                                                  stratify_by_column=args.label_column_name
                                                  if args.label_column_name in raw["train"].column_names else None)
            raw["train"], raw["validation"] = split["train"], split["test"]
    image_column = args.image_column_name or ("img" if "img" in raw["train"].column_names else "image")
    for split in ("train", "validation"):
        check_column(raw[split], image_column, "--image_column_name")
        check_column(raw[split], args.label_column_name, "--label_column_name")
    return raw, image_column


def make_transforms(size, mean, std):
    """PIL image -> normalised CHW float tensor; the train version crops randomly and flips."""
    mean = torch.tensor(mean).view(3, 1, 1)
    std = torch.tensor(std).view(3, 1, 1)
    pad = max(size // 8, 1)

    def to_tensor(image):
        image = image.convert("RGB")
        if image.size != (size, size):
            image = image.resize((size, size), Image.BILINEAR)
        return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)

    def train(image):
        x = torch.nn.functional.pad(to_tensor(image)[None], (pad, pad, pad, pad), mode="reflect")[0]
        top, left = torch.randint(0, 2 * pad + 1, (2,)).tolist()
        x = x[:, top:top + size, left:left + size]
        if torch.rand(()) < 0.5:
            x = x.flip(-1)
        return (x - mean) / std

    def evaluate(image):
        return (to_tensor(image) - mean) / std

    return train, evaluate


def count_images(batch):
    return batch["pixel_values"].shape[0]


def main(argv=None):
    args = parse_args(argv)
    shipped = not args.train_dir and not args.dataset_name
    announce(f"vit_cifar.py: training {args.model_name_or_path or f'a {args.model_size} ViT from scratch'}"
             f"{' (dense)' if args.dense else ' as Pixelfly'} on "
             f"{'the shipped digits' if shipped else args.dataset_name or args.train_dir} "
             f"({'GPU' if torch.cuda.is_available() else 'CPU'})"
             + ("; the offline default: --dataset_name uoft-cs/cifar10 for CIFAR-10" if shipped else ""))
    accelerator = make_accelerator(args, fixed_shapes=True)
    set_seed(args.seed)

    if args.model_name_or_path:
        load_model_config(args.model_name_or_path, "vit")  # a wrong model fails before the data is read
    with accelerator.main_process_first():
        raw, image_column = load_images(args)
    labels = raw["train"].features[args.label_column_name].names
    if args.model_name_or_path:
        with hub_access("--model_name_or_path", args.model_name_or_path, "give a local ViT folder"):
            processor = AutoImageProcessor.from_pretrained(args.model_name_or_path, backend="pil")
            model = AutoModelForImageClassification.from_pretrained(
                args.model_name_or_path, num_labels=len(labels), id2label=dict(enumerate(labels)),
                label2id={name: i for i, name in enumerate(labels)}, ignore_mismatched_sizes=True)
    else:
        preset = {k: v for k, v in MODEL_SIZES[args.model_size].items()
                  if k not in ("block_size", "lr", "batch_size")}
        config = ViTConfig(**preset, intermediate_size=4 * preset["hidden_size"], image_size=args.image_size,
                           patch_size=args.patch_size, hidden_dropout_prob=args.dropout,
                           attention_probs_dropout_prob=args.dropout, num_labels=len(labels),
                           id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)})
        processor = ViTImageProcessorPil(size={"height": args.image_size, "width": args.image_size},
                                      image_mean=CIFAR_MEAN, image_std=CIFAR_STD)
        model = AutoModelForImageClassification.from_config(config)

    train_transform, eval_transform = make_transforms(model.config.image_size, processor.image_mean,
                                                      processor.image_std)

    def with_transform(transform):
        def apply(batch):
            return {"pixel_values": [transform(image) for image in batch[image_column]],
                    "labels": batch[args.label_column_name]}
        return apply

    train_set, eval_set = raw["train"], raw["validation"]
    train_set, eval_set = limit_samples(args, train_set, eval_set)
    train_set = train_set.with_transform(with_transform(train_transform))
    eval_set = eval_set.with_transform(with_transform(eval_transform))

    def collate(examples):
        return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
                "labels": torch.tensor([e["labels"] for e in examples])}

    train_dataloader = make_train_dataloader(train_set, args, collate)
    eval_dataloader = DataLoader(eval_set, collate_fn=collate, batch_size=args.per_device_eval_batch_size)
    sparsity = dense_rate = None
    if args.pixelfly_config is not None:
        if args.compare_dense_steps:
            dense_rate = time_dense_steps(model, accelerator, args, train_dataloader, count_images)
        with plan_must_fit():
            model = get_model(model, args.pixelfly_config, calibration_data=calibration_batches(train_dataloader, args))
        sparsity = print_plan(model, accelerator, args)

    optimizer = make_optimizer(model, args, accelerator.device)
    lr_scheduler = make_scheduler(optimizer, args, accelerator, train_dataloader)
    model, optimizer, train_dataloader, eval_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, eval_dataloader, lr_scheduler)
    init_tracking(accelerator, args, "vit_pixelfly")

    def evaluate_accuracy(model):
        model.eval()
        metric = evaluate.load(str(METRICS / "accuracy"), keep_in_memory=True)
        for batch in eval_dataloader:
            with torch.no_grad():
                predictions = model(pixel_values=batch["pixel_values"]).logits.argmax(dim=-1)
            predictions, references = accelerator.gather_for_metrics((predictions, batch["labels"]))
            metric.add_batch(predictions=predictions.tolist(), references=references.tolist())
        return metric.compute()

    model, result = TrainingLoop(accelerator, args, model, optimizer, lr_scheduler, train_dataloader,
                                 evaluate_accuracy, count_fn=count_images,
                                 unit="images").run()

    finish(accelerator, args, model, result, sparsity, processor=processor, recipe="vit_cifar.py",
           base=f"ViT ({args.model_name_or_path or args.model_size + ' preset, from scratch'})",
           dataset=args.train_dir or args.dataset_name or "the shipped digits",
           model_class="AutoModelForImageClassification", metric="accuracy",
           tags=["vit", "image-classification"], extra={"image_size": model.config.image_size}, dense_rate=dense_rate)
    return result


if __name__ == "__main__":
    run_main(main)
