"""Leaving bigadapt: huggingface/peft loads our export with the same logits; the merged model matches too."""
from __future__ import annotations

import torch
from transformers import AutoModelForSequenceClassification

from bigadapt.config import config_from_dict
from bigadapt.export import load_trained, resolve_checkpoint
from bigadapt.model import build_base

from .conftest import check, run_cli


def _inputs():
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(1, 96, (6, 16), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_peft_loads_the_export_with_matching_logits(trained_run, tmp_path):
    from peft import PeftModel
    ours, manifest, cfg = load_trained(trained_run)
    out = tmp_path / "peft"
    check(run_cli("export", str(trained_run), str(out), "--format", "peft"))
    base = build_base(config_from_dict(manifest["config"]).model, cfg.train.seed).eval()
    peft_model = PeftModel.from_pretrained(base, out).eval()
    x = _inputs()
    with torch.no_grad():
        expected, got = ours(**x).logits, peft_model(**x).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the adapter matters: the base alone gives other logits
        assert not torch.allclose(build_base(cfg.model, cfg.train.seed).eval()(**x).logits, expected, atol=1e-4)


def test_merged_model_matches(trained_run, tmp_path):
    ours, _, _ = load_trained(trained_run)
    out = tmp_path / "merged"
    check(run_cli("merge", str(resolve_checkpoint(trained_run)), str(out)))
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    x = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(merged(**x).logits, ours(**x).logits, rtol=1e-4, atol=1e-5)


def test_bitfit_merges_and_adapters_refuse_in_one_line(tmp_path, capsys):
    """Written, not trained (tests/run_dirs.py): the merge is the subject. Every method's acceptance is checked in
    tests/test_export_cases.py; here the merged BitFit model's logits too."""
    from bigadapt import cli

    from .conftest import tiny_config
    from .run_dirs import write_run
    for method, ok in (("bitfit", True), ("adapter_h", False)):
        run_dir = write_run(tmp_path / method, tiny_config(tmp_path / method, method={"name": method}))
        capsys.readouterr()
        code = cli.main(["merge", str(run_dir), str(tmp_path / f"{method}-merged")])
        err = capsys.readouterr().err
        if ok:
            assert code == 0, err
            ours, _, _ = load_trained(run_dir)
            merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / f"{method}-merged").eval()
            with torch.no_grad():
                torch.testing.assert_close(merged(**_inputs()).logits, ours(**_inputs()).logits, rtol=1e-4,
                                           atol=1e-5)
        else:
            assert code == 2 and err.count("\n") == 1 and "cannot be merged" in err and "Traceback" not in err


def test_loading_a_run_keeps_transformers_quiet_and_restores_its_settings():
    """load_trained restores the head from the adapter file, so transformers' 'head MISSING' load report
    (a warning per load: 8 per `bench section7 report`) is silenced there, and only there."""
    import logging

    from transformers.utils import logging as hf_logging

    from bigadapt.export import _quiet_transformers
    logger = hf_logging.get_logger("transformers.modeling_utils")
    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_warning()
    try:
        with _quiet_transformers():
            assert not logger.isEnabledFor(logging.WARNING) and not hf_logging.is_progress_bar_enabled()
        assert logger.isEnabledFor(logging.WARNING) and hf_logging.is_progress_bar_enabled() == bars
    finally:
        hf_logging.set_verbosity(level)
