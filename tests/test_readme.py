"""The README's Python example runs as printed (into a temporary folder)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_python_api_example_runs(tmp_path):
    text = (REPO / "README.md").read_text()
    code = text[text.index("## Python API"):].split("```python\n", 1)[1].split("```", 1)[0]
    assert 'write_layer_sets(stack, "out"' in code
    code = code.replace('"out"', repr(str(tmp_path / "out")))
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "out" / "layers.psd").is_file() and (tmp_path / "out" / "meta.json").is_file()
