"""The sharded reader's pieces without a process group (the real ranks: tests/distributed/test_sharded_loading.py),
and the allocator setting that keeps a CPU rank's memory where the accounting says."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from bigadapt import loading

from .conftest import REPO, env


@pytest.mark.parametrize("shape", [(7, 5), (13,), (3, 4, 5), ()])
def test_covering_reads_any_flat_range(tmp_path, shape):
    """A ZeRO-3 partition is a range of the flattened tensor: the rows read must cover it, the cut must be exact."""
    t = torch.arange(int(torch.tensor(shape).prod()) if shape else 1, dtype=torch.float32).reshape(shape)
    save_file({"t": t}, str(tmp_path / "x.safetensors"))
    flat, n = t.reshape(-1), t.numel()
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        for start in range(n):
            for end in range(start + 1, n + 1):
                assert torch.equal(loading._covering(f.get_slice("t"), start, end), flat[start:end]), (start, end)


def test_find_checkpoint_index_single_and_bin(tmp_path):
    save_file({"a": torch.zeros(2), "b": torch.ones(3)}, str(tmp_path / "model.safetensors"))
    single = loading.find_checkpoint(str(tmp_path))
    assert set(single.files) == {"a", "b"}
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_file({"a": torch.zeros(2)}, str(sharded / "m-1.safetensors"))
    save_file({"b": torch.ones(3)}, str(sharded / "m-2.safetensors"))
    (sharded / loading.INDEX).write_text(json.dumps({"weight_map": {"a": "m-1.safetensors", "b": "m-2.safetensors"}}))
    assert loading.find_checkpoint(str(sharded)).files == {"a": str(sharded / "m-1.safetensors"),
                                                            "b": str(sharded / "m-2.safetensors")}
    pickled = tmp_path / "bin"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"")
    assert "no model.safetensors" in loading.find_checkpoint(str(pickled))


def test_fallback_reasons_without_zero3():
    assert loading.fallback_reason({"dtype": torch.float32}, None) == "not under ZeRO-3"


def test_fallback_reasons_under_zero3(monkeypatch):
    import transformers.integrations as integrations
    monkeypatch.setattr(integrations, "is_deepspeed_zero3_enabled", lambda: True)
    from transformers import AutoConfig
    cfg = AutoConfig.for_model("gpt2")
    assert loading.fallback_reason({"config": cfg, "dtype": torch.float32}, cfg) is None
    assert "quantized" in loading.fallback_reason({"config": cfg, "dtype": torch.float32,
                                                   "quantization_config": object()}, cfg)
    assert "no dtype" in loading.fallback_reason({"config": cfg}, cfg)
    cfg.auto_map = {"AutoModel": "x.Y"}
    assert "remote code" in loading.fallback_reason({"config": cfg, "dtype": torch.float32,
                                                     "trust_remote_code": True}, cfg)


# ---------------------------------------------------------------- allocator: freed gather buffers go back
RSS_SCRIPT = """
import sys, torch
from pathlib import Path
from bigadapt import engine
set_ = engine.return_freed_memory() if sys.argv[1] == "on" else {}
def rss():
    line = [x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmRSS:")][0]
    return int(line.split()[1]) * 1024
before = rss()
pairs = [(torch.ones(1 << 20, dtype=torch.uint8), torch.ones(8)) for _ in range(200)]  # 1 MiB buffers, pinned
pins = [small for _, small in pairs]; del pairs  # the buffers freed, as ZeRO-3 frees gathered weights
print(repr((set_, rss() - before)))
"""


def _freed(mode: str, **extra) -> tuple[dict, int]:
    proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, mode], cwd=REPO, env=dict(env(), **extra),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return eval(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").exists() or torch.cuda.is_available(), reason="glibc/Linux CPU")
def test_freed_buffers_return_to_the_system():
    """engine.init_distributed calls return_freed_memory on CPU: 200 MiB of freed 1 MiB buffers stay resident
    under glibc's defaults and go back with the setting; a user's own MALLOC_* environment is left alone."""
    # glibc's mmap threshold once it has freed a few large buffers (it raises it dynamically, up to 32 MiB), and a
    # heap top that is not trimmed (fragmented by live small blocks, as a rank's heap is): freed buffers stay
    _, kept = _freed("off", MALLOC_MMAP_THRESHOLD_=str(32 << 20), MALLOC_TRIM_THRESHOLD_=str(1 << 30))
    applied, returned = _freed("on")
    assert applied == {"MALLOC_MMAP_THRESHOLD_": 131072, "MALLOC_TRIM_THRESHOLD_": 131072}
    assert kept > 150 * 2**20 and returned < 30 * 2**20, (kept, returned)
    user, _ = _freed("on", MALLOC_MMAP_THRESHOLD_="1048576")
    assert user == {"MALLOC_TRIM_THRESHOLD_": 131072}


def test_init_distributed_applies_the_setting(monkeypatch):
    from bigadapt import engine
    calls = []
    monkeypatch.setenv("RANK", "0")  # no rendezvous variables written into this process
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # nor its thread count changed
    monkeypatch.setattr(engine, "return_freed_memory", lambda: calls.append(1) or {})
    monkeypatch.setattr(engine, "_skip_shm_comm_build", lambda: (_ for _ in ()).throw(RuntimeError("stop")))
    with pytest.raises(RuntimeError, match="stop"):
        engine.init_distributed()
    assert calls == [1]
