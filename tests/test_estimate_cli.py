"""`bigadapt estimate` through the CLI (in this process: `cli.main(argv)` returns the exit code) on the GPT-3 175B
LoRA config, the paper's Table 4 run: --fit, --world, --gpu-memory, --activation-checkpointing, --set
zero.stage=auto, and bad flags. Everything runs on the meta device, so each call takes well under a second."""
from __future__ import annotations

import json

import pytest

from bigadapt import cli
from tests.conftest import REPO

GPT3 = str(REPO / "configs" / "gpt3-175b-lora.yaml")


def estimate(capsys, *flags: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(["estimate", "--config", GPT3, *flags])
    out = capsys.readouterr()
    return code, out.out, out.err


def as_json(capsys, *flags: str) -> dict:
    code, out, err = estimate(capsys, *flags, "--json")
    assert code == 0, err
    return json.loads(out)


def test_fit_prints_the_largest_micro_batch_and_the_fewest_gpus(capsys):
    flags = ("--activation-checkpointing", "--fit", "--gpu-memory", "80GB", "--world", "40")
    code, out, err = estimate(capsys, *flags)
    assert code == 0, err
    est = as_json(capsys, *flags)
    lora, full = est["method"], est["full_finetune"]
    assert lora["largest_micro_batch"] >= 1 and full["largest_micro_batch"] == 0  # full: not one sequence fits
    text = " ".join(out.split())
    assert f"lora: fits on 40 x 80.00 GiB; fewest GPUs that fit: {lora['fewest_ranks']}" in text
    assert f"largest micro-batch that fits: {lora['largest_micro_batch']}" in text
    assert lora["fewest_ranks"] < full["fewest_ranks"]
    assert lora["per_rank"]["total"] <= 80 * 2**30  # "80GB" reads as 80 GiB
    # the largest is the boundary: one more sequence per rank no longer fits
    over = as_json(capsys, *flags[:1], *flags[2:], "--micro-batch", str(lora["largest_micro_batch"] + 1))
    assert over["method"]["per_rank"]["total"] > 80 * 2**30


def test_fit_without_a_memory_is_one_line_not_silently_ignored(capsys):
    code, out, err = estimate(capsys, "--activation-checkpointing", "--fit")
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("bigadapt: error: --fit:") and "--gpu-memory" in err and "zero.memory_budget" in err
    code, out, err = estimate(capsys, "--fit", "--set", "zero.memory_budget=80GB")  # the config's budget will do
    assert code == 0 and "largest micro-batch that fits" in " ".join(out.split()), err


def test_world_and_activation_checkpointing_change_what_they_should(capsys):
    off = as_json(capsys, "--world", "8", "--no-activation-checkpointing")
    on = as_json(capsys, "--world", "16", "--activation-checkpointing")
    assert (off["layout"]["world"], on["layout"]["world"]) == (8, 16)
    assert off["method"]["per_rank"]["base_partition"] == pytest.approx(2 * on["method"]["per_rank"]["base_partition"],
                                                                        rel=1e-3)
    assert on["layout"]["activation_checkpointing"] and not off["layout"]["activation_checkpointing"]
    assert on["method"]["per_rank"]["activations"] < off["method"]["per_rank"]["activations"] / 10


def test_gpu_memory_and_stage_auto_say_what_fits_and_why(capsys):
    est = as_json(capsys, "--set", "zero.stage=auto", "--gpu-memory", "80GB", "--world", "8")
    assert est["layout"]["stage"] == 3  # the replicated base (~334 GiB) fits no 80 GB GPU
    code, out, err = estimate(capsys, "--set", "zero.stage=auto", "--gpu-memory", "80GB", "--world", "8")
    text = " ".join(out.split())
    assert code == 0 and text.startswith("zero.stage auto -> 3:"), err
    assert "lora: fits on 8 x" in text and "full: does NOT fit" in text


@pytest.mark.parametrize("flags,needle", [
    (["--world", "0"], "--world=0: must be at least 1"),
    (["--micro-batch", "0"], "--micro-batch=0: must be at least 1"),
    (["--seq-len", "-1"], "--seq-len=-1: must be at least 1"),
    (["--gpu-memory", "lots"], "--gpu-memory='lots'"),
    (["--set", "zero.stage=7"], "zero.stage"),
    (["--set", "nope.key=1"], "nope"),
])
def test_bad_values_are_one_line(capsys, flags, needle):
    code, out, err = estimate(capsys, *flags)
    assert code == 2 and out == "" and err.count("\n") == 1 and needle in err and "Traceback" not in err, err


@pytest.mark.parametrize("flags,needle", [(["--bogus"], "unrecognized arguments: --bogus"),
                                          (["--world", "many"], "--world: invalid int value: 'many'")])
def test_unparseable_flags_exit_2_naming_the_flag(capsys, flags, needle):
    """argparse's own refusal, as one line (no usage block) naming the flag and where the help is."""
    with pytest.raises(SystemExit) as e:
        cli.main(["estimate", "--config", GPT3, *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and needle in err and "Traceback" not in err, err
    assert err.startswith("bigadapt estimate: error: ") and err.rstrip().endswith("(see bigadapt estimate --help)")
