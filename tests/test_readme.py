"""The README's code as a user copies it: a snippet runs as written, in a fresh process."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_snippet(after: str) -> str:
    """The first ```python block of README.md after the line `after`."""
    text = (ROOT / "README.md").read_text()
    return text.split(after, 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


def test_the_one_layer_snippet_runs_as_written(tmp_path):
    proc = subprocess.run([sys.executable, "-c", readme_snippet("One layer on its own:")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 0 < float(proc.stdout.split()[-1]) < 1  # the printed projection error
