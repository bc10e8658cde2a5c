"""Run by test_merge_under_zero3 on 2 ranks: LoRA merge/unmerge on a ZeRO-3-partitioned model."""
import json
import sys

import torch

from bigadapt import zero
from bigadapt.methods.lora import lora_modules, merge, unmerge
from tests.conftest import zero3_engine

out = sys.argv[-1]
eng = zero3_engine()
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
