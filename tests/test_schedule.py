"""Learning-rate schedules (a pure function of the step) and the time-left estimate of the live display."""
from __future__ import annotations

import math

import pytest

from bigadapt import display
from bigadapt.config import config_from_dict, load_config
from bigadapt.errors import ConfigError
from bigadapt.loop import lr_at, warmup_steps

from .conftest import tiny_config


def _cfg(**train):
    return config_from_dict(tiny_config("r", train=dict({"lr": 1e-3}, **train)))


def test_cosine_decays_from_lr_to_zero_after_warmup():
    cfg = _cfg(schedule="cosine", warmup_steps=2)
    lrs = [lr_at(s, cfg, 12) for s in range(13)]
    assert lrs[:3] == [5e-4, 1e-3, 1e-3]  # warmup, then the peak
    assert lrs[7] == pytest.approx(5e-4)  # half way through the decay: half the peak
    assert lrs[12] == 0 and all(a > b for a, b in zip(lrs[2:], lrs[3:]))
    # the cosine's shape: slow near both ends, fastest in the middle
    assert lrs[2] - lrs[3] < lrs[6] - lrs[7] and lrs[11] - lrs[12] < lrs[6] - lrs[7]
    assert lrs[4] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 2 / 10)))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_min_lr_ratio_is_the_floor_of_the_decay(schedule):
    cfg = _cfg(schedule=schedule, min_lr_ratio=0.1)
    assert lr_at(0, cfg, 10) == pytest.approx(1e-3) and lr_at(10, cfg, 10) == pytest.approx(1e-4)
    assert lr_at(50, cfg, 10) == pytest.approx(1e-4)  # past the end (a larger max_steps on resume) stays there
    assert lr_at(5, cfg, 10) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # both pass the midpoint of lr and floor


def test_warmup_ratio_is_a_fraction_of_the_run_rounded_up():
    cfg = _cfg(warmup_ratio=0.1, schedule="constant")
    assert warmup_steps(cfg, 100) == 10 and warmup_steps(cfg, 15) == 2 and warmup_steps(cfg, 3) == 1
    assert [lr_at(s, cfg, 15) for s in range(3)] == [5e-4, 1e-3, 1e-3]
    assert warmup_steps(_cfg(warmup_ratio=0.07), 100) == 7  # not 8 from 7.000000000000001
    assert warmup_steps(_cfg(warmup_steps=7), 100) == 7 and warmup_steps(_cfg(), 100) == 0


def test_lr_is_a_pure_function_of_the_step():
    """What resume relies on: the same step gives the same lr, whatever was computed before."""
    cfg = _cfg(schedule="cosine", warmup_ratio=0.25, min_lr_ratio=0.05)
    forward = [lr_at(s, cfg, 20) for s in range(20)]
    assert [lr_at(s, cfg, 20) for s in reversed(range(20))] == forward[::-1]


@pytest.mark.parametrize("override,needle", [
    (["train.warmup_steps=5", "train.warmup_ratio=0.1"], "not both"),
    (["train.warmup_ratio=1.5"], "train.warmup_ratio=1.5"),
    (["train.min_lr_ratio=-0.1"], "train.min_lr_ratio=-0.1"),
    (["train.schedule=constant", "train.min_lr_ratio=0.1"], "constant schedule never decays"),
])
def test_bad_schedule_settings_are_one_line(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert needle in str(e.value) and "\n" not in str(e.value)


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_eta_counts_only_the_steps_this_process_ran():
    """Resumed at step 900 of 1000: 10 steps in 20 s here means 90 steps left take 180 s, not 2 s."""
    clock = _Clock()
    eta = display.Eta(start=900, total=1000, clock=clock)
    assert eta.seconds(900) is None and eta.text(900) == "-:--:--"  # no pace measured yet
    clock.now += 20
    assert eta.seconds(910) == pytest.approx(180) and eta.text(910) == "0:03:00"
    clock.now += 3600 * 25
    assert display.duration(3600 * 25 + 61) == "25:01:01" and eta.text(999) == "0:15:09"  # 90020 s / 99 steps


def test_a_long_eval_shows_a_transient_bar_beside_the_training_bar(monkeypatch):
    monkeypatch.setenv("BIGADAPT_FORCE_PROGRESS", "1")  # the bars render although pytest's output is no terminal
    with display.eval_progress(display.EVAL_BAR_MIN_BATCHES - 1) as advance:  # short: nothing to show
        advance()
    bar = display.progress(10, 0)
    bar.start()
    try:
        with display.eval_progress(30) as advance:  # joins the live training bar (rich allows one live display)
            eval_task = bar.tasks[-1]
            assert len(bar.tasks) == 2 and eval_task.total == 30
            for _ in range(30):
                advance()
            assert eval_task.completed == 30 and eval_task.fields["eta"] == "0:00:00"
        assert len(bar.tasks) == 1  # gone when the eval ends
    finally:
        bar.stop()
    with display.eval_progress(30) as advance:  # the final eval, after the training bar: a bar of its own
        advance()
