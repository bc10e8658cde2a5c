"""Install truth: a built wheel works away from the checkout, and the package declares what it imports.

The wheel is installed with --no-deps into its own folder and run by this venv's interpreter from a directory
outside the repository, so only the wheel's files can be found: a file read at run time that the wheel does not
carry (the SLURM job template once) fails here as it would for a user.
"""
from __future__ import annotations

import configparser
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .conftest import REPO, env

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def wheel_site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(out), str(REPO)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    (whl,) = out.glob("bigadapt-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    assert "bigadapt/templates/job.sbatch" in names
    assert not any(n.startswith(("tests/", "launch/")) for n in names)
    site = out / "site"
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                           str(whl)], capture_output=True, text=True, timeout=300)
    assert inst.returncode == 0, inst.stderr[-2000:]
    return site


def _bigadapt(site: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    e = env()
    e["PYTHONPATH"] = str(site)  # the wheel's copy, not the checkout's
    return subprocess.run([sys.executable, "-m", "bigadapt", *args], cwd=cwd, env=e, capture_output=True,
                          text=True, timeout=600)


def test_the_wheel_submits_estimates_and_trains_from_any_directory(wheel_site, tmp_path):
    where = subprocess.run([sys.executable, "-c", "import bigadapt; print(bigadapt.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, env=dict(env(), PYTHONPATH=str(wheel_site)))
    assert where.stdout.strip().startswith(str(wheel_site)), where.stdout + where.stderr

    job = _bigadapt(wheel_site, tmp_path, "submit", "--dry-run", "--set", f"run_dir={tmp_path / 'job'}")
    assert job.returncode == 0, job.stderr
    assert "-m bigadapt train --config" in job.stdout and f"--chdir={tmp_path}" in job.stdout
    assert not (tmp_path / "job").exists()  # a dry run writes nothing

    est = _bigadapt(wheel_site, tmp_path, "estimate", "--json", "--gpus-per-node", "2")
    assert est.returncode == 0 and '"per_rank"' in est.stdout, est.stderr

    run = _bigadapt(wheel_site, tmp_path, "train", "--set", "train.max_steps=2", "--set", "train.eval_every=0",
                    "--set", "train.save_every=0", "--set", "data.num_train=128", "--set", "data.num_eval=32")
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert list((tmp_path / "runs/default/checkpoints").glob("step-*/adapter.safetensors"))


def _imported_top_level_packages() -> set[str]:
    import ast
    found = set()
    for path in (REPO / "bigadapt").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found


# import name -> distribution, where they differ; and what an import reaches only through an extra
_DIST = {"yaml": "pyyaml", "sklearn": "scikit-learn", "jinja2": "jinja2"}
_EXTRAS = {"peft": "bench", "wandb": "wandb"}
# imported from packages that a declared dependency itself requires (transformers: tokenizers, huggingface_hub;
# datasets: pyarrow)
_TRANSITIVE = {"tokenizers", "huggingface_hub", "packaging", "pyarrow"}


def test_every_runtime_import_is_declared():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    declared = {line.split(">")[0].split("=")[0].split("<")[0].strip().lower()
                for line in cfg["options"]["install_requires"].splitlines() if line.strip()
                and not line.strip().startswith("#")}
    extras = {name: {x.split(">")[0].strip().lower() for x in body.splitlines() if x.strip()
                     and not x.strip().startswith("#")} for name, body in cfg["options.extras_require"].items()}
    stdlib = set(sys.stdlib_module_names)
    third_party = {m for m in _imported_top_level_packages() if m not in stdlib and m != "bigadapt"}
    for module in sorted(third_party):
        dist = _DIST.get(module, module).lower()
        if module in _EXTRAS:
            assert dist in extras[_EXTRAS[module]], f"{module}: expected in the [{_EXTRAS[module]}] extra"
        else:
            assert dist in declared or module in _TRANSITIVE, f"{module} is imported but not in install_requires"


def test_no_unused_runtime_dependency():
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    imported = {_DIST.get(m, m).lower() for m in _imported_top_level_packages()}
    # needed without an import of their own: accelerate by transformers' DeepSpeed and 4-bit paths, bitsandbytes
    # by transformers' quantized loading (QLoRA), sentencepiece by tokenizers of LLaMA/T5-style models,
    # tensorboard by torch.utils.tensorboard, jinja2 by chat templates
    indirect = {"accelerate", "bitsandbytes", "sentencepiece", "tensorboard", "jinja2"}
    for line in cfg["options"]["install_requires"].splitlines():
        name = line.split(">")[0].split("=")[0].split("<")[0].strip().lower()
        if name and not name.startswith("#"):
            assert name in imported or name in indirect, f"{name} is declared but nothing imports it"
