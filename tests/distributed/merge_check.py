"""Run by test_merge_under_zero3 on 2 ranks: LoRA merge/unmerge on a ZeRO-3-partitioned model."""
import json
import sys

import torch

from bigadapt import engine, methods, zero
from bigadapt import model as base_model
from bigadapt.config import config_from_dict
from bigadapt.methods.lora import lora_modules, merge, unmerge
from tests.conftest import tiny_config

out = sys.argv[-1]
cfg = config_from_dict(tiny_config("unused", zero={"stage": 3, "param_persistence_threshold": 0}))
engine.init_distributed()
conf = engine.ds_config(cfg, zero.world_size(), cfg.train.batch_size // (cfg.train.micro_batch * zero.world_size()))
zero.register_for_loading(conf)
model = base_model.build_base(cfg.model, 0)
methods.apply(model, cfg)
eng, _ = engine.initialize(model, cfg, conf)
eng.eval()
x = torch.randint(1, 96, (3, 16), generator=torch.Generator().manual_seed(0))


def logits():
    with torch.no_grad():
        return eng(input_ids=x).logits.float()


base_out = logits()  # B = 0: the base model's output
g = torch.Generator().manual_seed(1)
for _, m in lora_modules(eng.module):
    with zero.gathered([m.lora_B], modify=True) as writer:
        assert m.lora_B.numel() > 0  # gathered: the true tensor, not a placeholder
        if writer:
            m.lora_B.data.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.5)
before = logits()
merge(eng.module)
merged = logits()
unmerge(eng.module)
after = logits()
if zero.rank() == 0:
    json.dump({"delta_visible": (before - base_out).abs().max().item(),
               "merged_vs_unmerged": (merged - before).abs().max().item(),
               "unmerged_vs_before": (after - before).abs().max().item()}, open(out, "w"))
