"""Helpers shared by the metric modules."""
from __future__ import annotations

from collections.abc import Sequence

from ..extras import require

NLG_EXTRA = "nlg-eval"


def check_aligned(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference sets")
    if any(len(refs) == 0 for refs in references):
        raise ValueError("every hypothesis needs at least one reference")


def nlg(module: str):
    """Import a package of the [nlg-eval] extra, or a one-line error naming the extra."""
    return require(module, NLG_EXTRA, "this metric")


def reference_streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    """sacrebleu's layout: one stream per reference index, None where a segment has fewer references."""
    width = max((len(r) for r in references), default=0)
    return [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]
