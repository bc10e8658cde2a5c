"""WikiSQL logical-form accuracy (Zhong et al. 2017), the WikiSQL metric of the LoRA paper's Table 4.

A prediction counts when it is the same query as the gold one, in the sense of WikiSQL's
`lib/query.py` `Query.__eq__`: same selected column, same aggregation, and the same *set* of
conditions (order ignored), condition values compared as lowercased strings. Queries may be given
as WikiSQL dicts `{"sel": int, "agg": int, "conds": [[col, op, value], ...]}` or as SQL text
`SELECT [AGG] <column> FROM <table> [WHERE <column> <op> <value> [AND ...]]` (what a generative
model writes); text is parsed with column names lowercased and whitespace collapsed, so
a column or value that itself contains " AND " or " WHERE " is misread. Compare like with like:
a dict (column indices) never equals a string (column names).
"""
from __future__ import annotations

import re
from collections.abc import Sequence

# The WikiSQL data format's operator order: queries store `agg` and condition ops as indices into these.
AGG_OPS = ("", "MAX", "MIN", "COUNT", "SUM", "AVG")
COND_OPS = ("=", ">", "<", "OP")

# (selected column, aggregation index, frozenset of (column, condition op index, lowercased value))
Query = tuple[object, int, frozenset]

_SELECT = re.compile(r"^\s*select\s+(.*?)\s+from\s+(.*?)(?:\s+where\s+(.*?))?\s*;?\s*$", re.I | re.S)
_AGGREGATE = re.compile(r"^(max|min|count|sum|avg)(?:\s+|\s*\()(.*?)\)?$", re.I | re.S)
_CONDITION = re.compile(r"^(.*?)\s*(=|>|<|\bop\b)\s*(.*)$", re.I | re.S)


def canonical_query(query: dict | str) -> Query:
    """The comparable form of a WikiSQL dict or SQL string; raises ValueError if a string does not parse."""
    if isinstance(query, dict):
        conds = frozenset((col, op, str(value).lower()) for col, op, value in query["conds"])
        return query["sel"], query["agg"], conds
    return _parse_sql(query)


def logical_form_accuracy(predictions: Sequence[dict | str], golds: Sequence[dict | str]) -> float:
    """Fraction of predictions equal to their gold query; an unparseable prediction counts as wrong."""
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions but {len(golds)} gold queries")
    correct = sum(_safe(p) == canonical_query(g) for p, g in zip(predictions, golds))
    return correct / len(golds) if golds else 0.0


def _safe(query: dict | str) -> Query | None:
    try:
        return canonical_query(query)
    except ValueError:
        return None


def _parse_sql(sql: str) -> Query:
    match = _SELECT.match(sql)
    if not match:
        raise ValueError(f"not a WikiSQL query: {sql!r}")
    selection, _, where = match.groups()
    agg, column = 0, selection
    aggregate = _AGGREGATE.match(selection)
    if aggregate:
        agg, column = AGG_OPS.index(aggregate.group(1).upper()), aggregate.group(2)
    conditions = re.split(r"\s+and\s+", where, flags=re.I) if where else []
    return _column(column), agg, frozenset(_parse_condition(c) for c in conditions)


def _parse_condition(text: str) -> tuple[str, int, str]:
    match = _CONDITION.match(text.strip())
    if not match:
        raise ValueError(f"not a WikiSQL condition: {text!r}")
    column, op, value = match.groups()
    return _column(column), COND_OPS.index(op.upper()), value.strip().strip("'\"").lower()


def _column(name: str) -> str:
    return " ".join(name.strip("()` ").lower().split())
