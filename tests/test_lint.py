"""The lint rules in pyproject.toml hold on every committed source file, so CI catches what review misses."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.fail("ruff is missing: install the test extras (pip install -e '.[test]')")
    done = subprocess.run([ruff, "check", "--no-cache", "bigadapt", "launch", "tests"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
