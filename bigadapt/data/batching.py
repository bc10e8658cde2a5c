"""Which examples each rank sees at each step, and how they become tensors.

The global batch of step s is a slice of the epoch's permutation (seeded by seed and epoch), so the data
position is a pure function of the step: a resume needs only the step, and the same global batch is
seen whatever the world size. Rank r takes micro-batches r, r+W, r+2W, ... of the global batch.
"""
from __future__ import annotations

import torch

IGNORE = -100


class StepSampler:
    def __init__(self, num_examples: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = num_examples, batch_size, seed
        self.steps_per_epoch = num_examples // batch_size  # the last partial batch is dropped
        self._order: tuple[int, list[int]] | None = None

    def _epoch_order(self, epoch: int) -> list[int]:
        if self._order is None or self._order[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._order = (epoch, torch.randperm(self.n, generator=g).tolist())
        return self._order[1]

    def global_indices(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.steps_per_epoch)
        return self._epoch_order(epoch)[k * self.batch_size:(k + 1) * self.batch_size]

    def rank_micro_batches(self, step: int, rank: int, world: int, micro: int) -> list[list[int]]:
        idx = self.global_indices(step)
        chunks = [idx[i:i + micro] for i in range(0, len(idx), micro)]
        return chunks[rank::world]


def count_targets(examples: list[dict], objective: str) -> int:
    """Loss terms in these examples: one per example (seq_cls), one per predicted token (causal_lm)."""
    if objective == "seq_cls":
        return len(examples)
    return sum(_targets(e) for e in examples)


def _targets(e: dict) -> int:
    if e.get("loss_mask") is not None:  # token 0 of a row is never predicted
        return sum(e["loss_mask"][1:])
    return len(e["input_ids"]) - max(1, e.get("loss_from", 1))


def collate(examples: list[dict], objective: str, pad_id: int) -> dict:
    """Right-padded tensors; causal_lm labels mask the prompt (loss_from or loss_mask) and the padding."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, :len(e["input_ids"])] = torch.tensor(e["input_ids"])
        mask[i, :len(e["input_ids"])] = 1
    if examples[0].get("position_ids") is not None:
        # packed rows: no attention mask, so transformers finds each example's span from positions that restart
        # at 0; the padding tail restarts too and forms a span of its own, which no label reads
        pos = torch.arange(width).repeat(len(examples), 1)
        for i, e in enumerate(examples):
            pos[i, :len(e["position_ids"])] = torch.tensor(e["position_ids"])
        batch = {"input_ids": ids, "position_ids": pos}
    else:
        batch = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in examples[0]:
        types = torch.zeros_like(ids)
        for i, e in enumerate(examples):
            types[i, :len(e["token_type_ids"])] = torch.tensor(e["token_type_ids"])
        batch["token_type_ids"] = types
    if objective == "seq_cls":
        batch["labels"] = torch.tensor([e["label"] for e in examples])
    else:
        labels = ids.masked_fill(mask == 0, IGNORE)
        for i, e in enumerate(examples):
            if e.get("loss_mask") is not None:
                keep = torch.tensor(e["loss_mask"], dtype=torch.bool)
                labels[i, :len(keep)] = labels[i, :len(keep)].masked_fill(~keep, IGNORE)
            else:
                labels[i, :e.get("loss_from", 0)] = IGNORE
        batch["labels"] = labels
    return batch
