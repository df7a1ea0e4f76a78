"""The recipes' checks of their inputs: bad flags, paths, files and Hub access become one RecipeError line
(`common.run` prints it as `error: ...` and exits 1) before anything is trained or written."""
import argparse
import os
import socket
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse


class RecipeError(ValueError):
    """A bad flag or input, reported before training starts."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help shows every flag's default, except where the help text already says it (a default resolved per run,
    left None in the parser) and for on/off switches."""

    def _get_help_string(self, action):
        text = action.help
        if action.default in (None, False, argparse.SUPPRESS) or "default:" in text:
            return text
        return f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are RecipeErrors, so that every bad input ends the same way: one `error:`
    line and exit status 1, the status `accelerate launch` gives any failed script (commands/launch.py)."""

    def __init__(self, doc):
        super().__init__(description=doc, formatter_class=HelpFormatter)

    def error(self, message):
        raise RecipeError(f"{message} (see {self.prog} --help)")


def looks_local(name):
    """A path rather than a Hub id (`name` or `org/name`)."""
    return os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def check_model_folder(name, flag, *, weights=True):
    """A local model (or tokenizer) folder that from_pretrained can read: it exists, has config.json and,
    with weights=True, readable safetensors weights. Hub ids pass through. Raises RecipeError naming the fix."""
    if not looks_local(name):
        return
    path = Path(name).expanduser()
    if not path.exists():
        raise RecipeError(f"{flag} {name}: no such folder; give a folder written by save_pretrained, or a Hub id "
                          "such as openai-community/gpt2")
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
