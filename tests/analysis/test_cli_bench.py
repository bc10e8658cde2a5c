"""The `analyze` wiring and a tiny latency smoke run (no timing is asserted)."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from bigadapt import cli
from bigadapt.analysis.heatmap import heat_maps
from bigadapt.bench import latency

from ..conftest import check, run_cli


def test_analyze_wrong_number_of_runs_is_a_user_error(capsys):
    assert cli.main(["analyze", "subspace", "only-one"]) == 2
    assert "expects 2 run directories" in capsys.readouterr().err


def test_live_memory_is_only_for_the_peft_bench(capsys):
    with pytest.raises(SystemExit) as e:  # latency's own parser refuses what it does not take
        cli.main(["bench", "latency", "--live-memory"])
    assert e.value.code == 2 and "unrecognized arguments: --live-memory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "windows", "--live-memory"])
    assert e.value.code == 2


@pytest.mark.parametrize("bench,option", [("latency", "--cells"), ("throughput", "--stage"), ("study", "run"),
                                          ("section7", "report"), ("peft", "--peer-config"), ("windows", "--arch")])
def test_every_bench_has_its_own_help(bench, option, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", bench, "--help"])
    assert e.value.code == 0 and option in capsys.readouterr().out


def test_top_level_help_lists_every_subcommand_with_its_purpose(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for command in ("train", "estimate", "submit", "status", "eval", "results", "generate", "export", "merge",
                    "bench", "analyze"):
        assert command in out
    assert "{" not in out  # one subcommand a line, not a brace list


def test_peft_bench_passes_every_side_option_on():
    from bigadapt.bench.sides import side_argv
    args = cli.parser().parse_args(["bench", "peft", "--arch", "llama-small", "--steps", "3", "--layers", "24"])
    argv = side_argv(args)
    assert argv[argv.index("--arch") + 1] == "llama-small" and argv[argv.index("--layers") + 1] == "24"
    assert "--peer-config" in argv and "--ranks" not in argv


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


def test_latency_heat_maps_of_a_grid(tmp_path, capsys):
    result = latency.main(["--layers", "1", "--scale", "0.0625", "--cells", "1x8,1x16,2x8,2x16", "--trials", "2",
                           "--warmup", "0", "--adapter-r", "4", "--png", str(tmp_path / "fig5")])
    out = capsys.readouterr().out
    assert "adapter_h: % overhead, batch (rows) x seq (columns)" in out
    for k in ("lora_merged", "lora", "adapter_l", "adapter_h"):
        with Image.open(tmp_path / f"fig5-{k}.png") as im:
            assert im.format == "PNG" and im.width > 200 and im.height > 150
    # a saved run is drawn again on another colour scale without timing anything
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps(result))
    assert latency.main(["--from-json", str(saved), "--png", str(tmp_path / "again"), "--png-top", "5"]) == result
    assert (tmp_path / "again-adapter_h.png").exists()
    assert latency.main(["--from-json", str(saved), "--png", str(tmp_path / "vec"), "--format", "svg"]) == result
    assert (tmp_path / "vec-lora.svg").exists()
    fig = heat_maps(tmp_path / "one.png", {"lora": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}, "t",
                    xlabel="sequence length", ylabel="batch size", xticks=[8, 16], yticks=[1, 2], annotate=True)
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("sequence length", "batch size")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["8", "16"] and len(ax.texts) == 4


def test_latency_heat_maps_need_a_grid(tmp_path):
    with pytest.raises(SystemExit) as e:
        latency.main(["--cells", "1x8,2x16", "--png", "x"])
    assert e.value.code == 2
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(SystemExit) as e:
        latency.main(["--from-json", str(tmp_path / "bad.json")])
    assert e.value.code == 2


def test_peer_configs_put_transformers_zero3_on_the_right_sides():
    from bigadapt.bench.peft_step import side_config
    ours = {"zero_optimization": {"stage": 3, "stage3_max_live_parameters": 5, "stage3_param_persistence_threshold": 7}}
    for impl in ("bigadapt", "peft", "floor"):
        assert side_config(ours, impl, "same", 384) is ours
    assert side_config(ours, "bigadapt", "hf", 384) is ours and side_config(ours, "floor", "hf", 384) is ours
    for impl, peer in (("peft", "hf"), ("peft", "hf-all"), ("bigadapt", "hf-all"), ("floor", "hf-all")):
        z = side_config(ours, impl, peer, 384)["zero_optimization"]
        # transformers' guide: "auto" filled from the hidden size, the windows wide open
        assert z["stage"] == 3 and z["stage3_param_persistence_threshold"] == 3840
        assert z["stage3_max_live_parameters"] == z["stage3_max_reuse_distance"] == 10**9
        assert z["reduce_bucket_size"] == 384 * 384 and z["stage3_prefetch_bucket_size"] == int(0.9 * 384 * 384)
    assert ours["zero_optimization"]["stage3_max_live_parameters"] == 5  # the caller's config is not touched


@pytest.mark.distributed
def test_peft_bench_auto_mode_smoke(tmp_path):
    """`bench peft --mode auto` for real, as small as it goes: 2 rounds of bigadapt and peft (4 launches of 2
    ranks). Under a budget of 2 GiB bigadapt keeps the tiny base replicated (stage 2), peft runs transformers'
    ZeRO-3; the printed table and the JSON carry every row, interval and verdict (no time is asserted)."""
    out = tmp_path / "peft.json"
    proc = check(run_cli("bench", "peft", "--mode", "auto", "--memory-budget", "2GiB", "--layers", "1", "--hidden",
                         "64", "--micro-batch", "1", "--seq-len", "16", "--steps", "2", "--warmup", "1", "--rounds",
                         "2", "--sides", "bigadapt,peft", "--json-out", str(out), timeout=600))
    for line in ("│ bigadapt │     2 │", "│     peft │     3 │", "bigadapt/peft                wall ",
                 "bigadapt/peft                cpu  ", "bigadapt took stage 2 (replicated)", "(target < 0.5)",
                 "loss curves equal: MET"):
        assert line in proc.stdout
    s = json.loads(out.read_text())
    assert s["sides"] == ["bigadapt", "peft"] and [e["what"] for e in s["ratios"]] == ["bigadapt/peft"]
    wall = s["ratios"][0]["wall"]
    assert wall["rounds"] == 2 and wall["low"] < wall["ratio"] < wall["high"] and len(wall["per_round"]) == 2
    assert s["bigadapt"]["stage"] == 2 and s["peft"]["stage"] == 3 and s["auto"]["budget_bytes"] == 2 * 2**30
    # the same start and data: the first losses agree on every rank, the curves within the tolerance
    assert s["curves"]["first_rel_diff"] <= 1e-6 and s["curves"]["equal"]
    assert s["auto"]["peak_within_budget"] and s["bigadapt"]["peak_rss_mb"] > 0
