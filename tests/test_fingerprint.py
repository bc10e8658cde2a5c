"""The base fingerprint covers every tensor: a changed attention matrix, a redrawn output head and a merged model are
each refused; the same base, however it is loaded, is accepted; old (version-1) manifests are still verified."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from bigadapt import targets
from bigadapt.config import config_from_dict
from bigadapt.errors import CheckpointError
from bigadapt.export import resolve_checkpoint
from bigadapt.fingerprint import _fingerprint_v1, base_params, check_fingerprint, fingerprint, positions
from bigadapt.model import build_base

from .conftest import TINY_LLAMA, check, run_cli, tiny_config, write_config


def _fp(name_or_path, objective="causal_lm", **model):
    cfg = config_from_dict(tiny_config("unused", model=dict(name_or_path=str(name_or_path), arch={},
                                                            objective=objective, **model)))
    base = build_base(cfg.model, 0)
    return fingerprint(base, exclude=targets.head_prefixes(base))


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
    """A tiny LLaMA (untied head) saved three ways: as it is, with layer 0's q changed, with the head redrawn."""
    root = tmp_path_factory.mktemp("bases")
    cfg = config_from_dict(tiny_config("unused", TINY_LLAMA, model={"objective": "causal_lm"}))
    base = build_base(cfg.model, 0)
    base.save_pretrained(root / "base")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        q = base.model.layers[0].self_attn.q_proj.weight
        q.add_(torch.randn(q.shape, generator=g) * 1e-3)
    base.save_pretrained(root / "q_changed")
    base = AutoModelForCausalLM.from_pretrained(root / "base")
    with torch.no_grad():
        base.lm_head.weight.copy_(torch.randn(base.lm_head.weight.shape, generator=g) * 0.02)
    base.save_pretrained(root / "head_redrawn")
    return root


def test_positions_are_fixed_distinct_and_cover_small_tensors():
    assert positions("a.weight", 10) == list(range(10))
    p = positions("model.layers.0.self_attn.q_proj.weight", 4096 * 4096)
    assert p == positions("model.layers.0.self_attn.q_proj.weight", 4096 * 4096) and len(set(p)) == len(p) == 32
    assert p != positions("model.layers.1.self_attn.q_proj.weight", 4096 * 4096)


def test_every_tensor_is_sampled(llama_dirs):
    base = AutoModelForCausalLM.from_pretrained(llama_dirs / "base")
    fp = fingerprint(base)
    assert fp["sampled_elements"] == sum(min(32, p.numel()) for p in base.parameters())


def test_a_changed_attention_matrix_and_a_redrawn_head_are_refused(llama_dirs):
    saved = json.loads(json.dumps(_fp(llama_dirs / "base")))  # as a manifest holds it
    check_fingerprint(saved, _fp(llama_dirs / "base"), llama_dirs)  # the same base is accepted
    for variant in ("q_changed", "head_redrawn"):
        with pytest.raises(CheckpointError, match="another base \\(base weights differ"):
            check_fingerprint(saved, _fp(llama_dirs / variant), llama_dirs / variant)


def test_another_dtype_is_refused_with_its_fix(llama_dirs):
    saved = json.loads(json.dumps(_fp(llama_dirs / "base")))
    with pytest.raises(CheckpointError, match="dtypes differ: saved float32, this base bfloat16.*model.dtype"):
        check_fingerprint(saved, _fp(llama_dirs / "base", dtype="bf16"), llama_dirs)


def test_a_config_built_base_saved_to_a_directory_is_the_same_base(trained_run, tmp_path):
    ckpt = resolve_checkpoint(trained_run)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    cfg = config_from_dict(manifest["config"])
    build_base(cfg.model, cfg.train.seed).save_pretrained(tmp_path / "base")
    check_fingerprint(manifest["base"], _fp(tmp_path / "base", "seq_cls"), ckpt)


def test_a_merged_model_is_refused_as_a_base(trained_run, tmp_path):
    """bigadapt's own merge (marked) and a merge without the marker (as another tool would write it)."""
    ckpt = resolve_checkpoint(trained_run)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    check(run_cli("merge", str(ckpt), str(tmp_path / "merged")))
    with pytest.raises(CheckpointError, match="output of `bigadapt merge`.*already in its weights"):
        check_fingerprint(manifest["base"], _fp(tmp_path / "merged", "seq_cls"), ckpt)
    shutil.copytree(tmp_path / "merged", tmp_path / "unmarked")
    config = json.loads((tmp_path / "unmarked" / "config.json").read_text())
    del config["bigadapt_merged"]
    (tmp_path / "unmarked" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="another base \\(base weights differ"):
        check_fingerprint(manifest["base"], _fp(tmp_path / "unmarked", "seq_cls"), ckpt)
    # through the CLI: a run that starts from this adapter on the merged model is refused in one line
    run = tiny_config(tmp_path / "again", model={"name_or_path": str(tmp_path / "merged"), "arch": {},
                                                "objective": "seq_cls"}, method={**tiny_config("x")["method"],
                                                                                 "init_from": str(trained_run)})
    proc = run_cli("train", "--config", str(write_config(tmp_path / "again.yaml", run)))
    assert proc.returncode == 2 and "bigadapt merge" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_version_1_manifests_are_verified_the_old_way(llama_dirs):
    base = AutoModelForCausalLM.from_pretrained(llama_dirs / "base")
    old = dict(_fingerprint_v1(base_params(base, [])), model_type="llama")  # no "version": written before 2
    check_fingerprint(old, fingerprint(base), llama_dirs)
    with pytest.raises(CheckpointError, match="another base \\(base weights differ"):
        check_fingerprint(dict(old, weights_sha256="0" * 16), fingerprint(base), llama_dirs)
    with pytest.raises(CheckpointError, match="version-1 base fingerprint"):
        check_fingerprint(old, dict(fingerprint(base)), llama_dirs)  # a plain dict has no version-1 hashes
