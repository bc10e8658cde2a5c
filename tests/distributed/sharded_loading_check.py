"""Run by test_sharded_loading on N ranks: one checkpoint directory loaded by bigadapt's sharded reader and by
transformers' from_pretrained under the same ZeRO-3 config; every parameter and buffer gathered and compared bit
for bit. argv: checkpoint dir, objective (causal_lm | seq_cls), dtype (fp32 | bf16 | fp16), output json."""
import json
import sys

import torch

from bigadapt import engine, targets, zero
from bigadapt import model as base_model

path, objective, dtype_name, out = sys.argv[-4:]
dtype = base_model.DTYPES[dtype_name]
engine.init_distributed()
conf = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": dtype == torch.bfloat16}, "fp16": {"enabled": dtype == torch.float16}}
zero.register_for_loading(conf)
auto = base_model._auto_class(objective)
config = base_model.hf_config(type("M", (), {"name_or_path": path, "trust_remote_code": False,
                                              "objective": objective, "num_labels": 2})())
logged = []


def load(sharded):
    from bigadapt import display
    before = display.log
    display.log = lambda msg, *a, **k: (logged.append((sharded, msg)), before(msg, *a, **k))
    try:
        model = base_model.from_pretrained(auto, path, sharded=sharded, config=config, dtype=dtype)
    finally:
        display.log = before
    base_model.random_init(model, 0, targets.head_prefixes(model))  # a fresh head, drawn as build_base draws it
    return model


def whole(model):
    values = {}
    for name, p in model.named_parameters():
        with zero.gathered([p]):
            values[name] = p.detach().clone()
    values.update({f"buffer:{n}": b.detach().clone() for n, b in model.named_buffers()})
    return values


ours = load(True)
ours_values, ours_new = whole(ours), ours.bigadapt_new_modules
tied = ours.get_output_embeddings() is not None and \
    ours.get_output_embeddings().weight is ours.get_input_embeddings().weight
partition = {n: zero.local_numel(p) for n, p in ours.named_parameters()}
del ours
theirs = load(False)
theirs_values = whole(theirs)
differ = sorted(n for n in theirs_values if n not in ours_values or not torch.equal(
    theirs_values[n].view(torch.uint8) if theirs_values[n].is_floating_point() else theirs_values[n],
    ours_values[n].view(torch.uint8) if ours_values[n].is_floating_point() else ours_values[n]))
result = {"rank": zero.rank(), "n": len(theirs_values), "differ": differ,
          "extra": sorted(set(ours_values) - set(theirs_values)),
          "dtypes": sorted({str(v.dtype) for k, v in ours_values.items() if not k.startswith("buffer:")}),
          "new_modules": [ours_new, theirs.bigadapt_new_modules], "tied": tied,
          "fallback_lines": [m for s, m in logged if s and "from_pretrained" in m],
          "partition_numel": sum(partition.values()),
          "whole_numel": sum(v.numel() for k, v in ours_values.items() if not k.startswith("buffer:"))}
results = zero.all_gather_object(result)
if zero.rank() == 0:
    json.dump(results, open(out, "w"))
