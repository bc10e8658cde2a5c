"""`bench section7` on real (tiny) runs: the untrained control is exactly the run's init, and the report's
tables carry the values the analysis functions give, with known answers where two runs are identical."""
from __future__ import annotations

import pytest
import torch

from bigadapt.analysis import subspace as sub
from bigadapt.bench import section7, section7_report
from bigadapt.bench.study import run_configs

from ..conftest import TINY_GPT2, check, run_cli, tiny_config, write_config

# d = 160 > r = 64: a 64-dim row space is not the whole space, so φ is not 1 by construction
WIDE = dict(TINY_GPT2, n_layer=1, n_embd=160)


def test_untrained_factors_are_the_runs_init(tmp_path, trained_run):
    run_dir = tmp_path / "still"
    # a learning rate too small to move A: what the run saved is what it started from
    cfg = tiny_config(run_dir, train={"lr": 1e-12, "max_steps": 2})
    check(run_cli("train", "--config", str(write_config(tmp_path / "still.yaml", cfg))))
    trained, _ = sub.load_factors(str(run_dir))
    init, _ = sub.load_factors(str(run_dir), untrained=True)
    assert trained.keys() == init.keys() and trained
    for key in trained:
        torch.testing.assert_close(init[key].A, trained[key].A, rtol=0, atol=1e-8)
        assert not init[key].B.any()  # LoRA starts from ΔW = 0
        torch.testing.assert_close(init[key].W, trained[key].W, rtol=0, atol=0)
    moved, _ = sub.load_factors(str(trained_run))  # a run that learned: its A is not its init
    start, _ = sub.load_factors(str(trained_run), untrained=True)
    assert all((moved[k].A - start[k].A).abs().max() > 1e-4 for k in moved)


def test_the_control_refuses_a_run_from_another_base(tmp_path, trained_run):
    """The untrained control rebuilds the base as the trained adapter does, and checks it the same way: a
    checkpoint whose manifest names other base weights is refused either way, in one line."""
    import json
    import shutil

    from bigadapt import checkpoint
    from bigadapt.errors import CheckpointError
    ckpt = tmp_path / "step"
    shutil.copytree(checkpoint.complete(trained_run / "checkpoints")[-1], ckpt)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["base"]["weights_sha256"] = "0" * 64
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    for untrained in (False, True):
        with pytest.raises(CheckpointError, match="another base \\(base weights differ"):
            sub.load_factors(str(ckpt), untrained=untrained)


@pytest.fixture(scope="module")
def section7_out(tmp_path_factory):
    """The four runs the report needs, tiny, all with seed 0: "r64-seed1" is then the same run as "r64"."""
    out = tmp_path_factory.mktemp("section7")
    cfgs = [tiny_config(out / f"synthetic-lora-{name}", WIDE,
                        method={"r": section7.RUNS[name][0], "alpha": 16},
                        train={"seed": 0, "max_steps": 6, "lr": 5e-3}, zero={"stage": 0})
            for name in section7.RUNS]
    # two at a time, as `bench study --jobs 2` runs them: the driver's parallel path on real runs
    assert run_configs(out, cfgs, jobs=2) == 0
    return out


def _row(text: str, table: str, key: str) -> list[float]:
    section = text.split(table, 1)[1].split("\n## ", 1)[0]
    line = next(ln for ln in section.splitlines() if ln.startswith(f"| {key} |"))
    return [float(c) for c in line.strip("|").split("|")[1:]]


def test_report_tables(section7_out, capsys, tmp_path):
    runs = section7_report.find_runs(section7_out)
    assert list(runs) == list(section7.RUNS)
    assert section7_report.report(section7_out, str(tmp_path / "s7")) == 0
    text = capsys.readouterr().out
    key = "transformer.h.0.attn.c_attn[v]"
    r8, r64 = (sub.load_factors(str(runs[n]))[0] for n in ("r8", "r64"))
    # Fig. 3: the table shows φ over A's row space, as the analysis computes it
    phi_8_64 = sub.phi(sub.right_singular(r8[key].A), sub.right_singular(r64[key].A), 8, 64)
    assert _row(text, "## Fig. 3", key)[4] == pytest.approx(phi_8_64, abs=1e-3)
    assert _row(text, "## Fig. 3", "random subspaces")[4] == pytest.approx(64 / 160, abs=1e-3)
    # Fig. 4 on two identical runs: every subspace is shared, trained and at init, and ΔW's too
    assert _row(text, "## Fig. 4", key) == pytest.approx([1.0] * 8, abs=1e-3)
    # Table 7: W's own top directions hold more of W than ΔW's or a random matrix's
    row = _row(text, "## Table 7", key)
    assert row[2] > row[1] and row[2] > row[3]
    from PIL import Image
    for fig in ("fig3", "fig4"):
        with Image.open(tmp_path / f"s7-{fig}.png") as im:
            assert im.format == "PNG" and im.width > 300


def test_report_names_the_missing_runs(tmp_path):
    from bigadapt.errors import BigadaptError
    with pytest.raises(BigadaptError, match="no complete run for r4, r8, r64, r64-seed1"):
        section7_report.report(tmp_path)


def test_failed_run_fails_the_driver(tmp_path):
    proc = run_cli("bench", "section7", "run", "--model", str(tmp_path / "no-model"), "--glue", str(tmp_path),
                   "--out", str(tmp_path / "out"), "--runs", "r4")
    assert proc.returncode == 2, proc.stdout + proc.stderr  # the run's own user error, passed on
    assert "sst2-lora-r4: FAILED (exit 2" in proc.stdout
    assert "no-model" in (tmp_path / "out" / "sst2-lora-r4.log").read_text()
