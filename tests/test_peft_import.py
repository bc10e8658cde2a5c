"""peft adapters in: `bigadapt import-peft` and `method.init_from=<peft dir>`. Adapters written by peft itself
(random A, B, head) give bigadapt the same logits as peft; bigadapt -> peft -> bigadapt -> peft is bit-exact; an
adapter the config does not match is one ConfigError line, before the run directory exists."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from bigadapt import checkpoint
from bigadapt.config import config_from_dict
from bigadapt.errors import ConfigError
from bigadapt.export import load_trained
from bigadapt.model import build_base
from bigadapt.peft_import import import_run

from .conftest import TINY_GPT2, TINY_LLAMA, check, run_cli, tiny_config, write_config

LLAMA = dict(targets=["q", "v", "o", "ffn_in"], r=4, alpha=8, rslora=True,
             rank_pattern={"layers.1.self_attn.o_proj": 2}, alpha_pattern={"up_proj": 3})


def _ids():
    return torch.randint(1, 96, (3, 12), generator=torch.Generator().manual_seed(5))


def _peft_adapter(tmp_path, arch, method, **lora):
    """A peft LoRA on the run's own base (build_base with its seed), random A, B and head, saved by peft."""
    from peft import LoraConfig, get_peft_model
    cfg = config_from_dict(tiny_config(tmp_path / "run", arch, method=method))
    model = get_peft_model(copy.deepcopy(build_base(cfg.model, cfg.train.seed)),
                           LoraConfig(modules_to_save=["score"], **lora))
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    model.save_pretrained(tmp_path / "peft")
    return cfg, model.eval()


@pytest.mark.parametrize("case", ["llama_rslora_patterns", "llama_dora", "gpt2_conv1d"])
def test_adapter_written_by_peft_gives_peft_logits(tmp_path, case):
    if case == "gpt2_conv1d":  # fused c_attn as one module, Conv1D weights
        cfg, theirs = _peft_adapter(tmp_path, TINY_GPT2, dict(targets=["c_attn", "c_proj"], r=4, alpha=8),
                                    r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)
    else:  # a regex string for target_modules, per-module ranks and alphas, rsLoRA (or DoRA)
        dora = case == "llama_dora"
        method = dict(LLAMA, dora=dora, rslora=not dora)
        cfg, theirs = _peft_adapter(
            tmp_path, TINY_LLAMA, method, r=4, lora_alpha=8, use_rslora=not dora, use_dora=dora,
            target_modules=r".*\.(q_proj|v_proj|o_proj|up_proj)", rank_pattern={"layers.1.self_attn.o_proj": 2},
            alpha_pattern={"up_proj": 3})
    import_run(tmp_path / "peft", cfg)
    ours, manifest, _ = load_trained(cfg.run_dir)
    assert manifest["step"] == 0 and manifest["imported_from"].endswith("peft")
    with torch.no_grad():
        expected = theirs(input_ids=_ids()).logits
        torch.testing.assert_close(ours(input_ids=_ids()).logits, expected, rtol=1e-5, atol=1e-5)
        with theirs.disable_adapter():  # the adapter matters
            assert not torch.allclose(theirs(input_ids=_ids()).logits, expected, atol=1e-3)


def test_round_trip_bigadapt_peft_bigadapt_peft_is_bit_exact(trained_run, tmp_path):
    """GPT-2's q,v slices of c_attn go out as a block-structured rank-2r c_attn LoRA and come back as slices."""
    import json

    from bigadapt.export import to_peft
    to_peft(trained_run, tmp_path / "out1")
    again = tmp_path / "again"
    check(run_cli("import-peft", str(tmp_path / "out1"), "--config", str(trained_run / "config.yaml"),
                  "--set", f"run_dir={again}"))
    to_peft(again, tmp_path / "out2")
    first, second = (load_file(tmp_path / o / "adapter_model.safetensors") for o in ("out1", "out2"))
    assert first.keys() == second.keys() and len(first) > 2
    for k in first:
        assert torch.equal(first[k], second[k]), k
    source, imported = (load_file(checkpoint.complete(d / "checkpoints")[-1] / "adapter.safetensors")
                        for d in (trained_run, again))
    assert source.keys() == imported.keys() and all(torch.equal(source[k], imported[k]) for k in source)
    one, two = (json.loads((tmp_path / o / "adapter_config.json").read_text()) for o in ("out1", "out2"))
    assert one.pop("base_model_name_or_path").endswith("out1/base") and two.pop("base_model_name_or_path")
    assert one == two


def test_mismatches_are_one_config_error_naming_the_fix(tmp_path):
    cfg, _ = _peft_adapter(tmp_path, TINY_LLAMA, dict(targets=["q", "v"], r=8, alpha=16),
                           r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    cases = [(dict(r=4, alpha=8), "the adapter has r=8 on q_proj,v_proj; the config says method.r=4 — set method.r=8"),
             (dict(alpha=8), "set method.alpha=16"),
             (dict(targets=["q", "k", "v"]), "set method.targets to the adapter's target_modules"),
             (dict(dora=True), "set method.dora=false"),
             (dict(lora_init="pissa"), "set method.lora_init=kaiming")]
    for change, needle in cases:
        raw = tiny_config(tmp_path / "x", TINY_LLAMA,
                          method=dict(dict(targets=["q", "v"], r=8, alpha=16, init_from=str(tmp_path / "peft")),
                                      **change))
        with pytest.raises(ConfigError, match="method.init_from=") as e:
            checkpoint.check_init_from(config_from_dict(raw), None, False)
        assert needle in str(e.value) and "\n" not in str(e.value), (needle, str(e.value))


def test_whole_c_attn_lora_into_qv_slices_is_refused(tmp_path):
    cfg, _ = _peft_adapter(tmp_path, TINY_GPT2, dict(targets=["c_attn"]), r=8, lora_alpha=16,
                           target_modules=["c_attn"], fan_in_fan_out=True)
    raw = tiny_config(tmp_path / "x", method=dict(targets=["q", "v"], r=4, alpha=8, init_from=str(tmp_path / "peft")))
    with pytest.raises(ConfigError, match=r"writes to every part of the fused projection.*targets=\[c_attn\]"):
        checkpoint.check_init_from(config_from_dict(raw), None, False)


def test_train_from_a_peft_dir_and_refusals_write_nothing(tmp_path):
    _peft_adapter(tmp_path, TINY_GPT2, dict(targets=["c_attn"]), r=4, lora_alpha=8, target_modules=["c_attn"],
                  fan_in_fan_out=True)
    peft_dir = tmp_path / "peft"
    run_dir = tmp_path / "refused"
    raw = tiny_config(run_dir, method=dict(targets=["c_attn"], init_from=str(peft_dir), r=2))
    proc = run_cli("train", "--config", str(write_config(tmp_path / "r.yaml", raw)))
    assert proc.returncode == 2 and "set method.r=4" in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
    assert not run_dir.exists()  # refused before the lock, the directory or any file
    run_dir = tmp_path / "trained"
    raw = tiny_config(run_dir, method=dict(targets=["c_attn"], init_from=str(peft_dir)),
                      train=dict(max_steps=1, lr=1e-12))
    proc = check(run_cli("train", "--config", str(write_config(tmp_path / "ok.yaml", raw))))
    assert "method tensors start from" in proc.stdout + proc.stderr
    started = load_file(checkpoint.complete(run_dir / "checkpoints")[-1] / "adapter.safetensors")
    theirs = load_file(peft_dir / "adapter_model.safetensors")
    for n, t in started.items():
        if "lora_" in n:
            torch.testing.assert_close(t, theirs[f"base_model.model.{n}.weight"], rtol=0, atol=1e-9)
