"""Batches prepared off the training thread: each step's micro-batches, collated ahead by DataLoader workers.

Item k of `StepBatches` is everything step (start + k) needs on this rank — the global batch's loss-term and token
counts, and this rank's collated micro-batches — as a pure function of the step (batching.StepSampler), so
workers may run ahead in any order and a resume starts the stream at its step: the batches are the ones the
synchronous path would build, bit for bit. `train.data_workers` sets the workers per rank; the default is 2 on a
GPU (host collation and the host-to-device copy overlap the step; batches are pinned) and 0 on CPU, where the
ranks already use every core and a worker would only take cycles from them.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from .. import methods
from .batching import collate, count_targets

GPU_WORKERS = 2  # per rank: one collating while the other's batch waits in the queue


class StepBatches(Dataset):
    def __init__(self, cfg, task, sampler, pad: int, rank: int, world: int, start: int, total: int):
        self.cfg, self.task, self.sampler, self.pad = cfg, task, sampler, pad
        self.rank, self.world, self.start, self.total = rank, world, start, total

    def __len__(self) -> int:
        return max(0, self.total - self.start)

    def __getitem__(self, k: int) -> dict:
        step = self.start + k
        examples = [self.task.train[i] for i in self.sampler.global_indices(step)]
        micro = []
        for idx in self.sampler.rank_micro_batches(step, self.rank, self.world, self.cfg.train.micro_batch):
            mine = [self.task.train[i] for i in idx]
            batch = collate(mine, self.task.objective, self.pad)
            batch.update(methods.extra_inputs(self.cfg, mine))
            micro.append(batch)
        return {"step": step, "n_terms": count_targets(examples, self.task.objective),
                "tokens": sum(len(e["input_ids"]) for e in examples), "micro": micro}


def workers(cfg) -> int:
    """train.data_workers, or the default for this machine (module docstring)."""
    if cfg.train.data_workers is not None:
        return cfg.train.data_workers
    return GPU_WORKERS if torch.cuda.is_available() else 0


def step_batches(cfg, task, sampler, pad: int, rank: int, world: int, start: int, total: int):
    """An iterator over steps start..total-1 of this rank (see StepBatches), prepared by `workers(cfg)` processes."""
    n = workers(cfg)
    data = StepBatches(cfg, task, sampler, pad, rank, world, start, total)
    # batch_size=None: each item already is one step; workers keep prefetch_factor steps each ready
    return iter(DataLoader(data, batch_size=None, shuffle=False, num_workers=n,
                           pin_memory=torch.cuda.is_available(), prefetch_factor=2 if n else None,
                           persistent_workers=False))
