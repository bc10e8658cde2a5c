"""The `analyze` wiring and a tiny latency smoke run (no timing is asserted)."""
from __future__ import annotations

import json

import pytest
import torch

from bigadapt import cli
from bigadapt.bench import latency

from ..conftest import check, run_cli


def test_analyze_wrong_number_of_runs_is_a_user_error(capsys):
    assert cli.main(["analyze", "subspace", "only-one"]) == 2
    assert "expects 2 run directories" in capsys.readouterr().err


def test_live_memory_is_only_for_the_peft_bench(capsys):
    assert cli.main(["bench", "latency", "--live-memory"]) == 2
    assert "only `bench peft` takes it" in capsys.readouterr().err


def test_latency_smoke_reports_every_variant():
    result = latency.main(["--layers", "1", "--scale", "0.0625", "--cells", "1x8,2x8", "--trials", "2",
                           "--warmup", "0", "--adapter-r", "4"])
    assert [(c["batch"], c["seq"]) for c in result["cells"]] == [(1, 8), (2, 8)]
    assert set(result["cells"][0]["overhead_pct"]) == {"lora_merged", "lora", "adapter_l", "adapter_h"}


def test_latency_interval_is_the_median_ci():
    assert latency.median_ci([float(v) for v in range(1, 101)]) == (50.5, 40.0, 61.0)  # n = 100: 40th, 61st
    g = torch.Generator().manual_seed(0)  # it covers the true median (0.5) about 95% of the time
    hits = [lo <= 0.5 <= hi for lo, hi in (latency.median_ci(torch.rand(100, generator=g).tolist())[1:]
                                           for _ in range(400))]
    assert 0.92 <= sum(hits) / len(hits) <= 0.99
    base = [1.0, 2.0, 4.0]  # paired: each trial's variant against the base of the same trial
    assert latency.paired_overhead({"base": base, "lora": [1.01, 2.02, 4.04]}, "lora")[0] == pytest.approx(1.0)


def test_cells_parse():
    assert latency.parse_cells("table1") == [(32, 512), (16, 256), (1, 128)]
    assert len(latency.parse_cells("fig5")) == 18 and latency.parse_cells("4x64") == [(4, 64)]


def test_throughput_smoke_times_every_phase_of_both_sides(tmp_path):
    # through the CLI in its own process: the bench joins a (one-rank) process group, which must not outlive it
    out = tmp_path / "throughput.json"
    check(run_cli("bench", "throughput", "--json", str(out), "--layers", "1", "--scale", "0.0625", "--batch", "2",
                  "--seq", "8", "--steps", "2", "--warmup", "1", "--r", "2"))
    result = json.loads(out.read_text())
    d = result["arch"]["n_embd"]
    # LoRA on q and v of one layer: A (r x d) and B (d x r) each; full trains every base tensor
    assert result["trainable"]["lora"] == 2 * (2 * d + d * 2)
    assert result["trainable"]["full"] > 100 * result["trainable"]["lora"]
    for side in ("lora", "full"):
        m = result["median_s"][side]
        assert set(m) == {"forward", "backward", "optimizer", "step"} and min(m.values()) > 0
        assert max(m["forward"], m["backward"], m["optimizer"]) <= m["step"]  # each phase is part of its step
