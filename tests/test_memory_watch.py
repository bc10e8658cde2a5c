"""Memory above the prediction is a warning at the step it happens, naming the rank (issue 19), not only a line in
the end-of-run report; the log records carry the largest rank's peak."""
from __future__ import annotations

import types

import torch

from bigadapt import loop

from .conftest import metrics


def _watcher(limit_mb, rank=1):
    return types.SimpleNamespace(memory_limit_mb=limit_mb, rank=rank)


def test_limit_is_the_prediction_plus_the_tolerance():
    predicted = {"total": 1000 * 2**20, "framework_overhead": 300 * 2**20}
    expected = (700 if torch.cuda.is_available() else 1000) * (1 + loop.MEMORY_TOLERANCE)
    assert abs(loop._memory_limit_mb(predicted) - expected) < 1e-9
    assert loop._memory_limit_mb(None) is None and loop._memory_limit_mb({}) is None


def test_warns_once_on_the_rank_and_step_it_happens(capsys):
    w = _watcher(100.0)
    loop.Loop._watch_memory(w, {"mem_mb": 99.0}, 3)
    assert capsys.readouterr().err == ""
    loop.Loop._watch_memory(w, {"mem_mb": 150.0}, 4)
    err = capsys.readouterr().err
    assert "rank 1 at step 4" in err and "150 MiB" in err and "100 MiB" in err and err.count("\n") == 1
    loop.Loop._watch_memory(w, {"mem_mb": 300.0}, 5)  # once per process: a log full of it helps nobody
    assert capsys.readouterr().err == ""


def test_logged_records_carry_the_largest_ranks_peak(trained_run):
    logged = [m for m in metrics(trained_run) if "loss" in m]
    assert logged and all(m["mem_mb_max"] >= m["mem_mb"] > 0 for m in logged)
