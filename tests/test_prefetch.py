"""Batches collated by DataLoader workers (data/prefetch.py) are the synchronous path's batches, bit for bit."""
from __future__ import annotations

import torch

from bigadapt.config import config_from_dict
from bigadapt.data import prefetch
from bigadapt.data.batching import StepSampler, collate, count_targets

from .conftest import check, run_cli, tiny_config, train_losses, write_config


class _Task:
    objective = "causal_lm"

    def __init__(self, n: int):
        g = torch.Generator().manual_seed(0)
        self.train = [{"input_ids": torch.randint(1, 90, (int(torch.randint(3, 12, (1,), generator=g)),),
                                                  generator=g).tolist(), "loss_from": 2} for _ in range(n)]


def _synchronous(cfg, task, sampler, rank, world, step):
    """What the loop built on the training thread before the prefetcher: the reference."""
    examples = [task.train[i] for i in sampler.global_indices(step)]
    micro = [collate([task.train[i] for i in idx], task.objective, 0)
             for idx in sampler.rank_micro_batches(step, rank, world, cfg.train.micro_batch)]
    return count_targets(examples, task.objective), sum(len(e["input_ids"]) for e in examples), micro


def test_worker_stream_equals_the_synchronous_batches_from_any_start(tmp_path):
    cfg = config_from_dict(tiny_config(tmp_path, train={"batch_size": 8, "micro_batch": 2, "data_workers": 2}))
    task, world = _Task(40), 2
    sampler = StepSampler(len(task.train), cfg.train.batch_size, seed=3)  # 5 steps an epoch: crosses epochs
    for rank in range(world):
        for start in (0, 7):  # a fresh run and a resume at step 7
            stream = list(prefetch.step_batches(cfg, task, sampler, 0, rank, world, start, 12))
            assert [item["step"] for item in stream] == list(range(start, 12))
            for item in stream:
                n_terms, tokens, micro = _synchronous(cfg, task, sampler, rank, world, item["step"])
                assert (item["n_terms"], item["tokens"]) == (n_terms, tokens)
                assert len(item["micro"]) == len(micro) == 2
                for got, want in zip(item["micro"], micro):
                    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_default_workers_are_none_on_cpu_and_the_setting_wins(tmp_path):
    cfg = config_from_dict(tiny_config(tmp_path))
    assert prefetch.workers(cfg) == (prefetch.GPU_WORKERS if torch.cuda.is_available() else 0)
    cfg = config_from_dict(tiny_config(tmp_path, train={"data_workers": 3}))
    assert prefetch.workers(cfg) == 3


def test_a_run_with_workers_trains_exactly_like_one_without(trained_run, tmp_path):
    """Workers forked inside a real training process (after the process group and the engine exist) feed the
    same steps: the losses equal those of the shared run, which collates on the training thread."""
    run_dir = tmp_path / "workers"
    cfg = tiny_config(run_dir, train={"save_every": 4, "keep_last": 3, "data_workers": 2})
    check(run_cli("train", "--config", str(write_config(tmp_path / "cfg.yaml", cfg))))
    assert train_losses(run_dir) == train_losses(trained_run)


def test_negative_workers_are_refused_in_one_line(tmp_path):
    proc = run_cli("train", "--config", str(write_config(tmp_path / "c.yaml",
                                                           tiny_config(tmp_path / "r", train={"data_workers": -1}))))
    assert proc.returncode == 2 and "train.data_workers" in proc.stderr and not (tmp_path / "r").exists()
