"""A run directory written in this process through bigadapt's own checkpoint code, without the trainer: for tests of
what reads a run (export, merge), where training is not the subject. The trainable tensors are the method's own
init moved off it (a LoRA's B = 0 would hide the adapter), so an exported or merged model that dropped any of them
gives other logits."""
from __future__ import annotations

from pathlib import Path

import torch

from bigadapt import checkpoint, methods, targets
from bigadapt import fingerprint as fp
from bigadapt import model as base_model
from bigadapt.config import config_from_dict, dump_config
from bigadapt.train import _manifest


def write_run(run_dir: Path, cfg_dict: dict, seed: int = 5, step: int = 1) -> Path:
    """`cfg_dict` (a tiny_config) as a run directory holding one complete checkpoint at `step`, exactly as a
    one-process run saves it: config.yaml, the trainable tensors (fp32), zero Adam moments, the base fingerprint."""
    cfg = config_from_dict(cfg_dict)
    model = base_model.build_base(cfg.model, cfg.train.seed)
    base_fp = fp.fingerprint(model, exclude=targets.head_prefixes(model))
    methods.apply_seeded(model, cfg)
    g = torch.Generator().manual_seed(seed)
    masters = {}
    for n, p in model.named_parameters():
        if p.requires_grad:  # moved by ~10% of its own scale (0.1 where it starts at zero): a "trained" adapter
            scale = 0.1 * float(p.detach().float().abs().mean()) or 0.1
            masters[n] = (p.detach().float() + scale * torch.randn(p.shape, generator=g)).contiguous()
    moments = {f"{n}.{k}": torch.zeros_like(t) for n, t in masters.items() for k in checkpoint.MOMENTS}
    state = {"step": step, "optimizer_step": step, "loss_scale": {}, "skipped_steps": 0, "samples_seen": 0,
             "world_size_at_save": 1, "seed": cfg.train.seed, "elapsed_s": 0.0, "train_s": 0.0}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    checkpoint._write_atomic(run_dir / "checkpoints" / f"step-{step:08d}", masters, moments, state,
                             _manifest(cfg, base_fp, 1))
    return run_dir
