"""The rehearsal bench's plumbing at a tiny size (bigadapt/bench/rehearsal.py): one plain process trains one
step, then merge runs as a child (generate skipped with --new-tokens 0: the same child plumbing, and
`bigadapt generate` has its own tests). Nothing about memory or time is asserted, only that every number the
report prints was measured and that the output directory is gone unless --keep."""
from __future__ import annotations

import json

from bigadapt import cli

from ..conftest import env


def test_rehearsal_writes_trains_merges_generates_and_cleans_up(tmp_path, monkeypatch, capsys):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env().items():
        monkeypatch.setenv(key, value)
    out, numbers = tmp_path / "rehearsal", tmp_path / "numbers.json"
    rc = cli.main(["bench", "rehearsal", "--params", "2e6", "--hidden", "32", "--ranks", "1", "--steps", "1",
                   "--seq-len", "8", "--new-tokens", "0", "--out", str(out), "--json", str(numbers)])
    printed = capsys.readouterr().out
    res = json.loads(numbers.read_text())
    assert rc == 0, printed
    assert not out.exists()  # no --keep
    assert res["params"] >= 2e6 and res["shards"] > 1 and res["write_peak"] > 0
    (rank,) = res["ranks"]
    assert rank["partition_bytes"] == res["base_bytes"]  # one rank under ZeRO-3 holds the whole base
    assert rank["load_peak"] >= rank["rss_before_load"] > 0
    assert [s["step"] for s in rank["steps"]] == [1] and all(s["peak"] >= s["rss"] > 0 for s in rank["steps"])
    assert res["estimate"]["total"] > res["estimate"]["activations"] > 0
    assert res["merge"]["rc"] == 0 and res["merged_bytes"] >= res["base_bytes"] and res["merge"]["peak"] > 0
    assert "generate" not in res and "bigadapt generate" not in printed  # --new-tokens 0
    assert "| 0 |" in printed and "bigadapt merge" in printed
