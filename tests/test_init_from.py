"""method.init_from: start the method's tensors from another run (the paper starts MRPC, RTE and STS-B from
the MNLI LoRA), with a fresh task head; refused for another base, method or shape."""
from __future__ import annotations

import torch
from safetensors.torch import load_file

from bigadapt import checkpoint

from .conftest import check, run_cli, tiny_config, write_config


def _adapter(run_dir):
    return load_file(checkpoint.complete(run_dir / "checkpoints")[-1] / "adapter.safetensors")


def test_starts_from_the_source_adapter_with_a_fresh_head(trained_run, tmp_path):
    run_dir = tmp_path / "next"
    # lr 1e-12: one step leaves every tensor where it started, so the saved adapter shows the start
    cfg = tiny_config(run_dir, method={"init_from": str(trained_run)}, train={"max_steps": 1, "lr": 1e-12})
    proc = check(run_cli("train", "--config", str(write_config(tmp_path / "c.yaml", cfg))))
    assert "method tensors start from" in proc.stdout + proc.stderr
    source, started = _adapter(trained_run), _adapter(run_dir)
    lora = [n for n in started if "lora_" in n]
    heads = [n for n in started if "lora_" not in n]
    assert lora and heads and set(started) == set(source)
    for n in lora:
        torch.testing.assert_close(started[n], source[n], atol=1e-9, rtol=0)
    assert all(not torch.allclose(started[n], source[n]) for n in heads)  # trained there, fresh here


def test_refused_for_another_method_shape_or_missing_source(trained_run, tmp_path):
    cases = [({"init_from": str(tmp_path / "nowhere")}, "no checkpoint there"),
             ({"init_from": str(trained_run), "r": 2}, "use the same method settings"),
             ({"init_from": str(trained_run), "name": "bitfit"}, "start from a run of the same method")]
    for i, (method, needle) in enumerate(cases):
        cfg = tiny_config(tmp_path / f"r{i}", method=method, train={"max_steps": 1})
        proc = run_cli("train", "--config", str(write_config(tmp_path / f"c{i}.yaml", cfg)))
        last = proc.stderr.strip().splitlines()[-1]
        assert proc.returncode == 2 and needle in last, (needle, proc.stderr[-2000:])
