"""Time budgets, eval marks and the constant schedule: what the BitFit/adapters study's time axis relies on.

No wall-clock value is asserted: only how the training clock orders steps, evals and the stop."""
from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from bigadapt import checkpoint
from bigadapt.bench import study
from bigadapt.bench.study_plot import figure, plot
from bigadapt.config import config_from_dict, load_config
from bigadapt.errors import ConfigError
from bigadapt.loop import lr_at

from .conftest import REPO, check, env, metrics, run_cli, tiny_config, write_config


def test_constant_schedule_holds_after_warmup():
    cfg = config_from_dict(tiny_config("r", train={"lr": 1e-3, "warmup_steps": 4, "schedule": "constant"}))
    assert [lr_at(s, cfg, 10) for s in (0, 3, 4, 9, 50)] == [2.5e-4, 1e-3, 1e-3, 1e-3, 1e-3]
    cfg.train.schedule = "linear"
    assert lr_at(4, cfg, 10) == 1e-3 and lr_at(7, cfg, 10) == pytest.approx(5e-4) and lr_at(10, cfg, 10) == 0


@pytest.mark.parametrize("override,needle", [
    ("train.schedule=step", "train.schedule='step'"), ("train.eval_at_s=[60, 30]", "train.eval_at_s"),
    ("train.eval_at_s=[0]", "increasing training-clock seconds"),
])
def test_bad_budget_settings_are_one_line(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value) and "\n" not in str(e.value)


def _evals(run_dir):
    return [m for m in metrics(run_dir) if m.get("split") == "eval"]


def test_truncating_a_constant_schedule_run_is_the_shorter_run(tmp_path):
    """The eval a long run makes at step 3 equals the final eval of a run that stops at step 3: so an eval at
    a training-clock mark is the result of a run given that budget."""
    long_run, short_run = tmp_path / "long", tmp_path / "short"
    common = {"schedule": "constant", "warmup_steps": 2}
    check(run_cli("train", "--config", str(write_config(tmp_path / "l.yaml", tiny_config(
        long_run, train=dict(common, max_steps=6, eval_every=3))))))
    check(run_cli("train", "--config", str(write_config(tmp_path / "s.yaml", tiny_config(
        short_run, train=dict(common, max_steps=3))))))
    at3 = next(e for e in _evals(long_run) if e["step"] == 3)
    assert _evals(short_run)[-1]["eval_loss"] == at3["eval_loss"]
    assert _evals(short_run)[-1]["accuracy"] == at3["accuracy"]


def _first_past(clock: dict[int, float], t: float) -> int:
    return min(s for s, c in clock.items() if c >= t)


# `bigadapt train` whose training clock advances exactly 0.75 s per step (0.75 is exact in binary, so the clock
# reads 0.75, 1.5, 2.25, 3.0, ...): where the budget and the marks fall depends on no machine's speed or load
FAKE_CLOCK_TRAIN = """
import itertools, sys
from bigadapt import loop
ticks = itertools.count()
loop.Loop.clock = staticmethod(lambda: next(ticks) * 0.75)  # Loop.step reads it twice per step
from bigadapt.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _train_on_fake_clock(config, *args: str) -> subprocess.CompletedProcess:
    script = config.parent / "fake_clock_train.py"
    script.write_text(FAKE_CLOCK_TRAIN)
    return check(subprocess.run([sys.executable, str(script), "train", "--config", str(config), *args], cwd=REPO,
                                env=env(), capture_output=True, text=True, timeout=300))


def test_marks_and_budget_follow_the_training_clock_and_survive_a_resume(tmp_path):
    run_dir = tmp_path / "run"
    train = {"max_steps": 100000, "schedule": "constant", "log_every": 1, "time_budget_s": 3.0,
             "eval_at_s": [1.0, 2.0, 50.0]}
    _train_on_fake_clock(write_config(tmp_path / "a.yaml", tiny_config(run_dir, train=train)))
    clock = {m["step"]: m["train_s"] for m in metrics(run_dir) if "loss" in m}
    state = json.loads((checkpoint.complete(run_dir / "checkpoints")[-1] / "state.json").read_text())
    stop = state["step"]
    # the budget stops the run at the first step boundary on or past it, and the clock is saved
    assert stop == _first_past(clock, 3.0) and state["train_s"] == pytest.approx(clock[stop], abs=1e-3)
    # each mark is evaluated at the first boundary on or past it (the final eval covers a mark reached there);
    # the mark at 50 s lies beyond the budget
    expected = sorted({_first_past(clock, m) for m in (1.0, 2.0)} | {stop})
    assert [e["step"] for e in _evals(run_dir)] == expected
    assert clock == {s: 0.75 * s for s in range(1, 5)} and expected == [2, 3, 4]  # marks past, budget on a boundary

    # a larger budget on the same run directory continues the same clock: earlier marks are not redone
    more = dict(train, time_budget_s=4.0)
    _train_on_fake_clock(write_config(tmp_path / "b.yaml", tiny_config(run_dir, train=more)), "--resume", "auto")
    clock = {m["step"]: m["train_s"] for m in metrics(run_dir) if "loss" in m}
    after = json.loads((checkpoint.complete(run_dir / "checkpoints")[-1] / "state.json").read_text())
    assert after["step"] == _first_past(clock, 4.0) > stop
    assert min(c for s, c in clock.items() if s > stop) > state["train_s"]
    assert [e["step"] for e in _evals(run_dir)] == expected + [after["step"]]
    assert after["step"] == 6 and after["train_s"] == 4.5  # 3.0 carried over + two steps of 0.75


def test_the_training_clock_is_real_time_spent_in_steps(tmp_path):
    """The fake clock above stands in for this one: the real clock counts step time, and only step time."""
    run_dir = tmp_path / "run"
    check(run_cli("train", "--config", str(write_config(tmp_path / "a.yaml", tiny_config(
        run_dir, train={"max_steps": 3, "log_every": 1})))))
    records = [m for m in metrics(run_dir) if "loss" in m]
    assert all(m["step_s"] > 0 for m in records)
    assert [m["train_s"] for m in records] == pytest.approx(list(itertools.accumulate(m["step_s"] for m in records)),
                                                            abs=1e-3)


def _row(task, method, fraction, scores):
    marks = [30.0, 60.0, 120.0]
    evals = [{"split": "eval", "train_s": m + 0.5, **s} for m, s in zip(marks, scores)]
    return {"task": task, "method": method, "fraction": fraction, "seed": 0, "budget": 120.0, "marks": marks,
            "evals": evals, "steps": 50, "train_s": 120.5, "step_s": 2.41, "trainable": 1234}


def test_study_table_and_plot_from_runs():
    rows = [_row("mrpc", "lora", 1.0, [{"accuracy": a, "f1": a + 0.1} for a in (0.6, 0.7, 0.8)]),
            _row("mrpc", "lora", 0.3, [{"accuracy": a, "f1": a + 0.1} for a in (0.5, 0.6, 0.7)]),
            _row("stsb", "bitfit", 1.0, [{"pearson": p, "spearman": p} for p in (0.1, 0.5, 0.8)])]
    text = study.table(rows)
    assert "| 100% · 30 s |" in text and "| 30% · 120 s |" in text
    assert "| mrpc (accuracy/f1) | lora | 1,234 | 60.0/70.0 | 70.0/80.0 | 80.0/90.0 | 50.0/60.0 |" in text
    assert text.splitlines()[2].endswith("| 50 | 2.41 | – |")  # steps, s/step, load (no cell record)
    assert "| stsb (pearson/spearman) | bitfit | 1,234 | 10.0/10.0 | 50.0/50.0 | 80.0/80.0 | – | – | – |" in text
    assert ET.fromstring(plot(rows, study.MAIN_METRIC)).tag == "{http://www.w3.org/2000/svg}svg"
    fig = figure(rows, study.MAIN_METRIC)
    lines = [line for ax in fig.axes for line in ax.get_lines()]
    assert len(lines) == 3 and all(len(line.get_xdata()) == 3 for line in lines)
    assert {line.get_linestyle() for line in lines} == {"-", "--"}  # 100% solid, 30% dashed


def test_study_eval_at_takes_the_first_eval_past_the_mark():
    row = _row("cola", "full", 1.0, [{"mcc": 0.1}, {"mcc": 0.2}, {"mcc": 0.3}])
    assert study._eval_at(row, 60.0)["mcc"] == 0.2 and study._eval_at(row, 45.0) is None


def test_study_seed_spread_per_cell():
    rows = [_row("mrpc", "lora", 1.0, [{"accuracy": a} for a in (0.6, 0.7, 0.8)]),
            dict(_row("mrpc", "lora", 1.0, [{"accuracy": a} for a in (0.65, 0.7, 0.75)]), seed=1),
            _row("cola", "full", 1.0, [{"mcc": 0.1}, {"mcc": 0.2}, {"mcc": 0.3}])]  # one seed: no row
    text = study.seeds_table(rows)
    assert "| mrpc (accuracy) | lora | 100% | 0, 1 | 60.0 / 65.0 | 70.0 / 70.0 | 80.0 / 75.0 | 5.0 |" in text
    assert "cola" not in text
    assert study.seeds_table(rows[2:]) == ""


def _step_row(task, method, fraction, seed, scores, marks=(40, 80, 120)):
    evals = [{"split": "eval", "step": m, "train_s": 3.0 * m, **sc} for m, sc in zip(marks, scores)]
    return {"task": task, "method": method, "fraction": fraction, "seed": seed, "unit": "steps",
            "budget": marks[-1], "marks": list(marks), "evals": evals, "steps": marks[-1], "train_s": 3.0 * marks[-1],
            "step_s": 3.0, "trainable": 99}


def test_study_step_budget_cells_are_configs_with_max_steps_and_evals_at_each_third():
    args = argparse.Namespace(
        out="o", model="m", glue="g", seq_len=128, seed=2, steps={"mrpc": 120, "cola": 360, "stsb": 120}, evals=3)
    cfg = study.cell_config(args, "cola", "lora", 0.3)
    assert cfg["run_dir"].endswith("cola-lora-f0.3-s2-n360")  # a step run never resumes a time-budget one
    assert cfg["train"]["max_steps"] == 360 and cfg["train"]["eval_every"] == 120
    assert "time_budget_s" not in cfg["train"] and cfg["train"]["seed"] == 2
    args.steps = None
    args.budget, args.marks = 90.0, [30.0, 60.0, 120.0]
    timed = study.cell_config(args, "cola", "lora", 0.3)["train"]
    assert timed["time_budget_s"] == 90.0 and timed["eval_at_s"] == [30.0, 60.0] and "max_steps" not in timed
    assert study._steps("50") == {t: 50 for t in study.TASKS}
    assert study._steps("cola=30") == {**study.STEPS, "cola": 30}


def test_study_refuses_a_step_budget_the_evals_do_not_divide(capsys):
    with pytest.raises(SystemExit) as e:
        study.main(["run", "--model", "m", "--glue", "g", "--steps", "100", "--evals", "3"])
    assert e.value.code == 2 and "multiple of --evals 3" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        study.main(["run", "--model", "m", "--glue", "g", "--jobs", "0"])
    assert e.value.code == 2 and "--jobs 0: at least 1" in capsys.readouterr().err


def test_study_report_on_step_budgets_groups_tasks_by_marks_and_averages_seeds():
    rows = [_step_row("mrpc", "lora", 1.0, s, [{"accuracy": a, "f1": a} for a in v])
            for s, v in ((0, (0.6, 0.7, 0.8)), (1, (0.62, 0.74, 0.77)), (2, (0.64, 0.72, 0.83)))]
    rows.append(_step_row("cola", "full", 1.0, 0, [{"mcc": m} for m in (0.0, 0.1, 0.2)], marks=(120, 240, 360)))
    assert study._eval_at(rows[0], 80)["accuracy"] == 0.7 and study._eval_at(rows[0], 60) is None
    tables = study.mean_table(rows).split("\n\n")
    assert len(tables) == 2  # MRPC's marks are not CoLA's: a table each
    assert "| 40 steps | 80 steps | 120 steps |" in tables[0] and "| 120 steps | 240 steps | 360 steps |" in tables[1]
    assert ("| mrpc (accuracy) | lora | 100% | 0, 1, 2 | 62.0 [60.0, 64.0] | 72.0 [70.0, 74.0] | 80.0 [77.0, 83.0] "
            "| 80.0/80.0 |") in tables[0]
    assert "| cola (mcc) | full | 100% | 0 | 0.0 | 10.0 | 20.0 | 20.0 |" in tables[1]
    assert "| 100% · 40 steps |" in study.table(rows)
    assert "| 0, 1, 2 | 60.0 / 62.0 / 64.0 |" in study.seeds_table(rows)
    fig = figure(rows, study.MAIN_METRIC)
    assert fig.axes[0].get_xlabel() == "training budget (optimizer steps)"
    assert list(fig.axes[0].get_lines()[0].get_xdata()) == [40, 80, 120]
