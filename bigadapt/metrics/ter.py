"""Translation Edit Rate as sacrebleu computes it (a port of Tercom; Snover et al. 2006).

TER = (sum over segments of the fewest edits to turn the hypothesis into one of its references)
/ (sum over segments of the average reference length). Edits are insertions, deletions,
substitutions and shifts of a contiguous phrase, each costing 1. Shifts are found greedily, as in
Tercom: repeatedly apply the shift that lowers the (beam-limited) edit distance most, ties broken
by longer phrase, earlier start, earlier target. Tokenization is sacrebleu's default: lowercase and
split on whitespace. The result is a fraction (sacrebleu prints it x100).

The DART/WebNLG evaluation in microsoft/LoRA (GenerationEval) averages per-segment pyter TER
instead; this corpus-level score is the sacrebleu/Tercom definition.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from .bleu import _check_aligned

_MAX_SHIFT_SIZE = 10
_MAX_SHIFT_DIST = 50
_BEAM_WIDTH = 25
_MAX_SHIFT_CANDIDATES = 1000
_INF = float("inf")
_MATCH, _SUB, _INS, _DEL = " ", "s", "i", "d"


def corpus_ter(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus TER; `references[i]` holds all references of `hypotheses[i]`."""
    _check_aligned(hypotheses, references)
    edits = ref_length = 0.0
    for hypothesis, refs in zip(hypotheses, references):
        hyp = hypothesis.lower().split()
        results = [translation_edit_rate(hyp, r.lower().split()) for r in refs]
        edits += min(e for e, _ in results)
        ref_length += sum(n for _, n in results) / len(results)
    if ref_length > 0:
        return edits / ref_length
    return 1.0 if edits > 0 else 0.0


def translation_edit_rate(hyp: list[str], ref: list[str]) -> tuple[int, int]:
    """(number of edits including shifts, reference length) for one hypothesis/reference pair."""
    if not ref:
        return len(hyp), 0
    edit_distance = _EditDistance(ref)
    shifts, checked = 0, 0
    while True:
        gain, shifted, checked = _best_shift(hyp, ref, edit_distance, checked)
        if checked >= _MAX_SHIFT_CANDIDATES or gain <= 0:
            break
        shifts, hyp = shifts + 1, shifted
    return shifts + edit_distance(hyp)[0], len(ref)


def _best_shift(hyp: list[str], ref: list[str], edit_distance: _EditDistance,
                checked: int) -> tuple[int, list[str], int]:
    distance, trace = edit_distance(hyp)
    align, ref_err, hyp_err = _alignment(trace)
    best = None
    for start_h, start_r, length in _matching_phrases(hyp, ref):
        # Only move a phrase that is misplaced in the hypothesis onto a reference position it fixes.
        if not any(hyp_err[start_h:start_h + length]) or not any(ref_err[start_r:start_r + length]):
            continue
        if start_h <= align[start_r] < start_h + length:
            continue
        previous = -1
        for offset in range(-1, length):
            if start_r + offset == -1:
                target = 0
            elif start_r + offset in align:
                target = align[start_r + offset] + 1
            else:
                break
            if target == previous:
                continue
            previous = target
            shifted = _shift(hyp, start_h, length, target)
            candidate = (distance - edit_distance(shifted)[0], length, -start_h, -target, shifted)
            checked += 1
            if best is None or candidate > best:
                best = candidate
        if checked >= _MAX_SHIFT_CANDIDATES:
            break
    if best is None:
        return 0, hyp, checked
    return best[0], best[4], checked


def _shift(words: list[str], start: int, length: int, target: int) -> list[str]:
    phrase = words[start:start + length]
    if target < start:
        return words[:target] + phrase + words[target:start] + words[start + length:]
    if target > start + length:
        return words[:start] + words[start + length:target] + phrase + words[target:]
    return words[:start] + words[start + length:length + target] + phrase + words[length + target:]


def _matching_phrases(hyp: list[str], ref: list[str]):
    """(hyp start, ref start, length) of every common phrase of up to _MAX_SHIFT_SIZE words."""
    for start_h in range(len(hyp)):
        for start_r in range(len(ref)):
            if abs(start_r - start_h) > _MAX_SHIFT_DIST:
                continue
            length = 0
            while hyp[start_h + length] == ref[start_r + length] and length < _MAX_SHIFT_SIZE:
                length += 1
                yield start_h, start_r, length
                if start_h + length == len(hyp) or start_r + length == len(ref):
                    break


class _EditDistance:
    """Levenshtein distance to one reference within a band around the length-scaled diagonal.

    Returns the distance and the edit trace that rewrites the reference into the hypothesis
    (insertions and deletions swapped), which is what the shift search reads. Rows are cached in a
    trie keyed by hypothesis words: shifted hypotheses share prefixes, so most rows are reused
    (sacrebleu's BeamEditDistance does the same; the cache changes speed, not results).
    """

    def __init__(self, ref: list[str]):
        self.ref = ref
        self.first_row = [(j, _DEL) for j in range(len(ref) + 1)]
        self.cache: dict = {}

    def __call__(self, hyp: list[str]) -> tuple[int, str]:
        rows, node = [self.first_row], self.cache
        for word in hyp:
            if word not in node:
                break
            node, row = node[word]
            rows.append(row)
        ratio = len(self.ref) / len(hyp) if hyp else 1
        beam = math.ceil(ratio / 2 + _BEAM_WIDTH) if _BEAM_WIDTH < ratio / 2 else _BEAM_WIDTH
        for i in range(len(rows), len(hyp) + 1):
            rows.append(self._row(hyp[i - 1], rows[-1], i, ratio, beam, last=i == len(hyp)))
            node[hyp[i - 1]] = ({}, rows[-1])
            node = node[hyp[i - 1]][0]
        return rows[-1][-1][0], _trace(rows, len(hyp), len(self.ref))

    def _row(self, word: str, above: list[tuple], i: int, ratio: float, beam: int, last: bool) -> list[tuple]:
        row = [(_INF, "x")] * (len(self.ref) + 1)
        diagonal = math.floor(i * ratio)
        high = len(self.ref) + 1 if last else min(len(self.ref) + 1, diagonal + beam)
        for j in range(max(0, diagonal - beam), high):
            if j == 0:
                row[0] = (above[0][0] + 1, _INS)
                continue
            same = word == self.ref[j - 1]
            # Tercom prefers match/substitution, then (in this flipped view) insertion, then deletion.
            for cost, op in ((above[j - 1][0] + (0 if same else 1), _MATCH if same else _SUB),
                             (above[j][0] + 1, _INS), (row[j - 1][0] + 1, _DEL)):
                if row[j][0] > cost:
                    row[j] = (cost, op)
        return row


def _trace(rows: list[list[tuple]], i: int, j: int) -> str:
    ops = []
    while i > 0 or j > 0:
        op = rows[i][j][1]
        ops.append(op)
        i, j = (i - 1, j - 1) if op in (_MATCH, _SUB) else (i - 1, j) if op == _INS else (i, j - 1)
    return "".join(reversed(ops))


def _alignment(trace: str) -> tuple[dict[int, int], list[int], list[int]]:
    """Reference position -> hypothesis position, and per-position error flags, from a trace."""
    pos_h = pos_r = -1
    align: dict[int, int] = {}
    ref_err: list[int] = []
    hyp_err: list[int] = []
    for op in trace:
        if op in (_MATCH, _SUB):
            pos_h, pos_r = pos_h + 1, pos_r + 1
            align[pos_r] = pos_h
            hyp_err.append(op == _SUB)
            ref_err.append(op == _SUB)
        elif op == _DEL:  # a reference word with no hypothesis counterpart
            pos_r += 1
            align[pos_r] = pos_h
            ref_err.append(1)
        else:
            pos_h += 1
            hyp_err.append(1)
    return align, ref_err, hyp_err
