"""zero.stage auto on 2 real ranks: a memory budget the replicated base fits in takes stage 2, one byte less
takes stage 3, and both runs train to the end with the choice said at start and recorded in estimate.json.

One launch runs this file as a script: both runs in the same two processes, one `bigadapt train` after the
other (max_steps 2). The budgets come from the accounting in the test process, before the launch.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import check, launch, tiny_config, train_each, train_losses, write_config

pytestmark = pytest.mark.distributed

DEEP_GPT2 = {"model_type": "gpt2", "n_layer": 8, "n_embd": 64, "n_head": 4, "vocab_size": 96, "n_positions": 64,
             "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "bos_token_id": 0, "eos_token_id": 0,
             "pad_token_id": 0}  # 8 blocks: partitioned + one-block windows hold less than the whole base
CASES = ("replicated", "partitioned")


def main(root: Path) -> int:
    return train_each(root / f"{case}.yaml" for case in CASES)


def _stage2_total(cfg_dict: dict) -> int:
    """Per-rank bytes the accounting predicts for the replicated layout (stage 2) on 2 CPU ranks."""
    from bigadapt import accounting, layout
    from bigadapt.config import config_from_dict
    cfg = config_from_dict(cfg_dict)
    lay = layout.run_layout(cfg, 2)
    lay.stage = 2
    return accounting.per_rank(accounting.shapes(cfg)[0], cfg, lay)["total"]


def test_auto_takes_stage_2_where_the_base_fits_replicated_and_3_one_byte_below(tmp_path):
    base = tiny_config(tmp_path / "probe", arch=DEEP_GPT2, train={"max_steps": 2})
    need = _stage2_total(base)
    budgets = {"replicated": need, "partitioned": need - 1}
    for case in CASES:
        write_config(tmp_path / f"{case}.yaml", tiny_config(
            tmp_path / case, arch=DEEP_GPT2, train={"max_steps": 2}, zero={"memory_budget": budgets[case]}))
    proc = check(launch(2, str(tmp_path), script="tests/distributed/test_stage_auto.py", timeout=600))
    assert "zero.stage auto -> 2: the replicated base" in proc.stdout
    assert "zero.stage auto -> 3: the base replicated does not fit (stage 2 needs" in proc.stdout
    for case, stage in zip(CASES, (2, 3)):
        run = tmp_path / case
        est = json.loads((run / "estimate.json").read_text())
        chosen = est["zero_stage"]
        assert chosen["requested"] == "auto" and chosen["stage"] == est["layout"]["stage"] == stage
        assert chosen["budget"] == budgets[case] and chosen["budget_from"] == "zero.memory_budget"
        assert est["per_rank"]["total"] <= budgets[case]
        assert (stage == 3) == (chosen["windows"] is not None)  # ZeRO-3's windows sized from the memory left
        assert yaml.safe_load((run / "config.yaml").read_text())["zero"]["stage"] == "auto"  # re-decided on resume
        assert max(train_losses(run)) == 2 and any((run / "checkpoints").glob("step-*"))  # trained to the end
        holdings = json.loads((run / "layout.json").read_text())
        held = [r["base_numel"] for r in holdings["ranks"]]
        if stage == 2:  # the whole base on each rank: nothing to gather
            assert held == [holdings["base_numel_total"]] * 2
        else:
            assert sum(held) >= holdings["base_numel_total"] > max(held)
        report = json.loads((run / "accounting.json").read_text())
        print(case, "model_states max rel error", report["model_states_max_rel_error"])
        assert report["model_states_max_rel_error"] <= 0.05, report
    # the same training whichever layout holds the base
    assert train_losses(tmp_path / "replicated") == pytest.approx(train_losses(tmp_path / "partitioned"), rel=1e-5)


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[-1])))
