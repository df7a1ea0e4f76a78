"""Checks of a training script's inputs: model folders (and their model family), data files, dataset columns and Hub
access each fail in one RecipeError line (`run_main` prints it as `error: ...` and exits 1) before anything is trained
or written."""
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlparse

from .errors import RecipeError


class Family(NamedTuple):
    """A model family the recipes train: its name in messages, its recipe, a Hub id to suggest, its Auto classes."""

    name: str
    recipe: str
    hub_example: str
    model_class: str
    processor_class: str


# by transformers model_type
FAMILIES = {
    "gpt2": Family("GPT-2", "gpt2_wikitext.py", "openai-community/gpt2", "AutoModelForCausalLM", "AutoTokenizer"),
    "vit": Family("ViT", "vit_cifar.py", "google/vit-base-patch16-224-in21k", "AutoModelForImageClassification",
                  "AutoImageProcessor"),
    "bert": Family("BERT", "bert_glue.py", "google-bert/bert-base-uncased", "AutoModelForSequenceClassification",
                   "AutoTokenizer"),
}
PIXELFLY_PREFIX = "pixelfly_"  # a Pixelfly model's model_type is this + its dense family's


def looks_local(name):
    """A path rather than a Hub id (`name` or `org/name`)."""
    return os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def check_model_folder(name, flag, family, *, weights=True):
    """A local model (or tokenizer) folder that from_pretrained can read: it exists, has config.json and,
    with weights=True, readable safetensors weights. Hub ids pass through. Raises RecipeError naming the fix, with
    a Hub id of the `family` (a FAMILIES key) as the example."""
    if not looks_local(name):
        return
    path = Path(name).expanduser()
    if not path.exists():
        raise RecipeError(f"{flag} {name}: no such folder; give a folder written by save_pretrained, or a Hub id "
                          f"such as {FAMILIES[family].hub_example}")
    if not path.is_dir():
        raise RecipeError(f"{flag} {name} is a file; give the folder that holds it (with config.json)")
    if not weights:
        return
    if not (path / "config.json").is_file():
        raise RecipeError(f"{flag} {name} has no config.json, so it is no saved transformers model; give a folder "
                          "written by save_pretrained")
    files = sorted(path.glob("*.safetensors"))
    if not files and not any(path.glob("*.bin")):
        raise RecipeError(f"{flag} {name} holds no weights (no model.safetensors): save the model into it with "
                          "save_pretrained, or give the folder that has them")
    from safetensors import safe_open

    for file in files:
        try:
            with safe_open(file, "pt"):
                pass
        except Exception as error:  # the rust SafetensorError has no Python base class to name
            raise RecipeError(f"{flag} {name}: {file} is truncated or no safetensors file ({error}); "
                              "save or download the model again") from None


def load_model_config(name, family):
    """The AutoConfig of --model_name_or_path `name`, which must be a dense model of `family` (a FAMILIES key):
    another family, or a Pixelfly model (a recipe's output), is a RecipeError saying what to do instead."""
    from transformers import AutoConfig

    ours = FAMILIES[family]
    with hub_access("--model_name_or_path", name, f"give a local {ours.name} folder"):
        config = AutoConfig.from_pretrained(name)
    model_type = config.model_type
    if model_type == PIXELFLY_PREFIX + family:
        raise RecipeError(pixelfly_input_advice(name, family))
    if model_type != family:
        other = FAMILIES.get(model_type.removeprefix(PIXELFLY_PREFIX))
        instead = f"; train it with recipes/{other.recipe}" if other else ""
        raise RecipeError(f"--model_name_or_path {name} is a {model_type!r} model, and {ours.recipe} trains "
                          f"{ours.name} (model_type {family!r}): give a {ours.name} folder or a Hub id such as "
                          f"{ours.hub_example}{instead}")
    return config


def pixelfly_input_advice(name, family):
    """What to do with a Pixelfly model (a recipe's output) given as --model_name_or_path: resume its run, or merge
    it into a dense model of its `family` (a FAMILIES key) and start from that."""
    ours = FAMILIES[family]
    resume = ""
    if looks_local(name):
        folder = Path(name)
        checkpoints = sorted((p.name for p in [*folder.glob("step_*"), *folder.glob("epoch_*")]
                              if (p / "trainer_state.json").is_file()), key=lambda n: int(n.partition("_")[2]))
        held = (f"it holds the checkpoints {', '.join(checkpoints)}" if checkpoints else
                "it holds no checkpoint: only runs with --checkpointing_steps can be resumed")
        resume = (f" To train that run further, rerun its command with --output_dir {name} --resume_from_checkpoint "
                  f"latest and a larger --max_train_steps ({held}).")
    dense = f"{name.rstrip('/')}-dense"
    merge = (f"import pixelfly_hf, transformers as t; t.{ours.model_class}.from_pretrained({name!r})"
             f".merge_and_unload().save_pretrained({dense!r}); "
             f"t.{ours.processor_class}.from_pretrained({name!r}).save_pretrained({dense!r})")
    return (f"--model_name_or_path {name} is a Pixelfly {ours.name} (model_type {PIXELFLY_PREFIX + family!r}), the "
            f"output of a recipe run, and {ours.recipe} starts from a dense {ours.name}.{resume} To fine-tune its "
            f"weights, merge them into a dense {ours.name} first: python -c \"{merge}\", then give "
            f"--model_name_or_path {dense} (the recipe projects it onto Pixelfly again; --dense keeps it dense)")


def check_data_file(name, flag, kinds):
    """A local data file (or glob) that exists and whose suffix is one of `kinds` (e.g. {"csv": "csv"}):
    returns the `datasets` builder name for it."""
    import glob

    if not glob.glob(name):
        raise RecipeError(f"{flag} {name}: no such file (a path or a glob pattern)")
    suffix = Path(name).suffix.lstrip(".")
    if suffix not in kinds:
        raise RecipeError(f"{flag} {name}: a .{suffix} file is not supported; give a "
                          f"{', '.join('.' + k for k in kinds)} file")
    return kinds[suffix]


@contextmanager
def hub_access(flag, name, offline):
    """Loading `name` given by `flag`: a Hub id fails in one RecipeError line when the Hub is unreachable
    (probed first: the libraries retry for ~25 s, then print a long traceback) or the load fails (not in the
    cache with HF_HUB_OFFLINE=1, no such repo). `offline` names the flags that need no network. Local paths
    pass through untouched."""
    if looks_local(name):
        yield
        return
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:  # offline, the libraries read the cache and never touch the network
        url = urlparse(constants.ENDPOINT)
        try:
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                     timeout=5).close()
        except OSError as error:
            raise RecipeError(f"{flag} {name} needs the Hugging Face Hub, and {constants.ENDPOINT} is unreachable "
                              f"({error}); {offline}, or set HF_HUB_OFFLINE=1 to use a copy in the cache") from None
    try:
        yield
    except OSError as error:  # datasets' ConnectionError and transformers' OSError both derive from it
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise RecipeError(f"{flag} {name}: cannot load it from the Hugging Face Hub ({first}); {offline}") from None


def check_column(dataset, column, flag):
    if column not in dataset.column_names:
        raise RecipeError(f"{flag} {column!r} is not a column of the dataset; its columns are "
                          f"{dataset.column_names}. Pass {flag} with one of them.")
