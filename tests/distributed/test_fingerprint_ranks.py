"""The base fingerprint is world-size independent: the same on 1, 2 and 3 ZeRO-3 ranks (partitions of uneven
length included) as in a plain process, read from each rank's own partition without gathering a tensor.

Run as a script by the test below (on n ranks): `python tests/distributed/test_fingerprint_ranks.py BASE_DIR OUT`.
"""
from __future__ import annotations

import json
import sys

from tests.conftest import TINY_LLAMA, check, launch, tiny_config


def _cfg(base_dir: str, stage: int):
    from bigadapt.config import config_from_dict
    return config_from_dict(tiny_config("unused", TINY_LLAMA, model={"name_or_path": base_dir, "arch": {},
                                                                     "objective": "causal_lm"},
                                        zero={"stage": stage, "param_persistence_threshold": 0},
                                        train={"batch_size": 12, "micro_batch": 2}))


def _sharded_fingerprint(base_dir: str, out: str) -> None:
    """Every rank: the base loaded partitioned under ZeRO-3, its fingerprint, the gathers it made."""
    import deepspeed

    from bigadapt import accounting, engine, model, targets, zero
    from bigadapt.fingerprint import fingerprint
    cfg = _cfg(base_dir, 3)
    engine.init_distributed()
    accumulation = cfg.train.batch_size // (cfg.train.micro_batch * zero.world_size())
    zero.register_for_loading(engine.ds_config(cfg, zero.world_size(), accumulation, accounting.shapes(cfg)[0]))
    base = model.build_base(cfg.model, 0)
    zero.unregister()
    assert all(zero.is_zero(p) for p in base.parameters())
    gathers, during = [], []
    real, sample = deepspeed.zero.GatheredParameters, zero.sample_elements

    def counting(params, *a, **k):
        gathers.append(1)
        return real(params, *a, **k)

    def watched(*a):
        before = len(gathers)
        try:
            return sample(*a)
        finally:
            during.append(len(gathers) - before)
    deepspeed.zero.GatheredParameters, zero.sample_elements = counting, watched
    fp = fingerprint(base, exclude=targets.head_prefixes(base))
    if zero.rank() == 0:
        json.dump({"fp": fp, "gathers_in_sample": during}, open(out, "w"))


def test_the_same_fingerprint_on_1_2_and_3_ranks(tmp_path):
    from bigadapt import model, targets
    from bigadapt.config import config_from_dict
    from bigadapt.fingerprint import fingerprint
    cfg = config_from_dict(tiny_config("unused", TINY_LLAMA, model={"objective": "causal_lm"}))
    model.build_base(cfg.model, 0).save_pretrained(tmp_path / "base")
    plain = model.build_base(_cfg(str(tmp_path / "base"), 0).model, 0)
    want = json.loads(json.dumps(fingerprint(plain, exclude=targets.head_prefixes(plain))))
    for n in (2, 3):
        out = tmp_path / f"fp{n}.json"
        check(launch(n, str(tmp_path / "base"), str(out), script="tests/distributed/test_fingerprint_ranks.py"))
        got = json.loads(out.read_text())
        assert got["fp"] == want, n
        assert got["gathers_in_sample"] == [0], n  # the version-2 sample reads partitions only


if __name__ == "__main__":
    _sharded_fingerprint(*[a for a in sys.argv[1:] if not a.startswith("--local_rank")][-2:])
