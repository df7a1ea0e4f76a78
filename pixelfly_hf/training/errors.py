"""RecipeError, a bad flag or input found before training starts, and the entry point that reports it in one line."""
import sys


class RecipeError(ValueError):
    """A bad flag or input, reported before training starts."""


def run_main(main):
    """A script's `if __name__ == "__main__":` entry: main(), with a RecipeError printed as one `error:` line (no
    traceback) and exit status 1, the status `accelerate launch` gives any failed script (commands/launch.py), so
    that `python` and `accelerate launch` agree."""
    try:
        main()
    except RecipeError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1)
