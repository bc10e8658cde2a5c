"""`bigadapt generate` and `bigadapt eval` on 2 ranks under the deepspeed launcher: the base built sharded with
ZeRO-3 as training builds it, the adapter loaded into the partitioned parameters; the same greedy outputs and
the same eval numbers as one plain process."""
import json

import pytest

from tests.conftest import check, launch, run_cli
from tests.test_generate import make_lm_run, outputs, write_prompts

pytestmark = pytest.mark.distributed


def test_generate_and_eval_on_two_ranks_match_one_process(tmp_path):
    run = make_lm_run(tmp_path)
    prompts = write_prompts(tmp_path / "prompts.jsonl")
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    check(run_cli("generate", str(run), "--file", str(prompts), "--out", str(one), "--max-new-tokens", "8"))
    check(launch(2, "generate", str(run), "--file", str(prompts), "--out", str(two), "--max-new-tokens", "8",
                        script="launch/bigadapt.py"))
    assert outputs(two) == outputs(one) and any(outputs(one))

    check(run_cli("eval", str(run)))
    single = json.loads((run / "eval-dev.json").read_text())
    check(launch(2, "eval", str(run), script="launch/bigadapt.py"))
    sharded = json.loads((run / "eval-dev.json").read_text())
    assert sharded["world_size"] == 2 and single["world_size"] == 1
    assert sharded["n"] == single["n"]
    assert sharded["metrics"] == pytest.approx(single["metrics"], rel=1e-5)
