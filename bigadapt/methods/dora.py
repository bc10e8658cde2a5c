"""DoRA (Liu et al. 2024, "Weight-Decomposed Low-Rank Adaptation"): W' = m * (W0 + s B A) / ||W0 + s B A||_row.

The base weight is split into a magnitude, one trained value per output row (`lora_magnitude_vector`, peft's
name; initialised to ||W0||_row, so training starts from the base model), and a direction that LoRA adapts.
As in the paper (section 4.3) and peft, the row norm is a constant in backward: it is recomputed every forward
from the current A, B without a gradient. The forward is peft's (tuners/lora/dora.py), written so autograd keeps
one [batch, seq, rows] tensor, (W0 x + s B A x):

    y = b + f * (W0 x + s B A x),    f = m / ||W0 + s B A||_row        (no dropout: W0 x is y - b)
    y = W0 x + b + (f - 1) W0 x' + f s B A x',   x' = dropout(x)       (dropout, as peft: W0 x' is recomputed)

A fused projection (GPT-2's c_attn with q,v only) gets a magnitude for the enabled slices' rows only: the rows of
a disabled slice (k) stay exactly the base's. peft has no per-slice DoRA, so the export writes a magnitude over
the whole output whose disabled rows are their own ||W0||_row (a factor of 1, to rounding): the same model.

The norm needs W0 whole inside this wrapper's forward, where ZeRO-3 gathers only the wrapper's own parameters:
W0 is registered as an external parameter of the wrapper (`zero.use_in_forward`), so DeepSpeed gathers it with
A, B, m for this one module, and releases it after. The initial ||W0||_row gathers W0 once, one module at a time.
On the meta device (accounting) the magnitude is only allocated.

Merge: W <- f * (W0 + s B A) on the enabled rows, with f's norm taken before the merge and kept for unmerge
(peft keeps it the same way: the merged weight no longer tells the norm). A quantized base is refused
(lora.validate): its weight is not W0 exactly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import zero
from ..errors import BigadaptError
from . import lora, lora_branch


class DoRA(lora.LoRA):
    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 slices: tuple[int, ...] | None = None, n_parts: int = 1, rslora: bool = False):
        super().__init__(base, r, alpha, dropout, slices, n_parts, rslora)
        # m: one per enabled output row, in B's row order; filled by init_magnitude once A, B (and W0) are final
        self.lora_magnitude_vector = nn.Parameter(torch.ones(self.lora_B.shape[0]))
        self._merged_norm = None
        zero.use_in_forward(self, base.weight)

    def init_magnitude(self) -> None:
        """*Collective under ZeRO-3.* m = ||W0 + s B A||_row (= ||W0||_row with B = 0), W0 gathered for this module."""
        w = self.base_layer.weight
        if w.is_meta:  # accounting's meta build: the shape is all it needs
            return
        with zero.gathered([w]), torch.no_grad():
            self.lora_magnitude_vector.copy_(self.row_norm(w))

    def _rows(self, w: torch.Tensor) -> torch.Tensor:
        """W laid out [out, in] (a view: Conv1D stores [in, out])."""
        return w.t() if self.fan_in_fan_out else w

    @torch.no_grad()
    def row_norm(self, w: torch.Tensor) -> torch.Tensor:
        """||W0 + s B A|| per enabled row, fp32, no gradient (a constant in backward, as the paper says)."""
        W = self._rows(w)
        delta = self._span_deltas(W.device)
        return torch.cat([torch.linalg.norm(W[a:b].float() + d, dim=1) for (a, b), d in zip(self.spans, delta)])

    def _span_deltas(self, device) -> list[torch.Tensor]:
        """s B_i A_i for each span, [rows_i, in], fp32."""
        A, B = self.lora_A.detach().float().to(device), self.lora_B.detach().float().to(device)
        return [self.scaling * (B[row:row + b - a] @ A[i * self.r:(i + 1) * self.r])
                for i, a, b, row in lora_branch._parts(self.spans)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        dropped = bool(self.dropout) and self.training
        h = (F.dropout(x, self.dropout, True) if dropped else x).to(self.lora_A.dtype)
        m = self.lora_magnitude_vector
        f = m / self.row_norm(self.base_layer.weight).to(m.dtype)
        # F.linear: autograd (or ZeRO-3's linear) keeps A, B themselves, which DeepSpeed gathers again for backward
        hA = F.linear(h, self.lora_A)
        if len(self.spans) == 1:
            lora_out = F.linear(hA, self.lora_B) * self.scaling
        else:
            lora_out = torch.cat([F.linear(hA[..., i * self.r:(i + 1) * self.r], self.lora_B[row:row + b - a])
                                  for i, a, b, row in lora_branch._parts(self.spans)], -1) * self.scaling
        y_rows = self._gather(y).to(lora_out.dtype)
        bias = self.base_layer.bias
        b_rows = self._gather(bias).to(lora_out.dtype) if bias is not None else None
        if dropped:  # W0 x' for the dropped input, as peft recomputes it: W0 x + b stays as the base gives it
            base = h @ torch.cat([self._rows(self.base_layer.weight)[a:b] for a, b in self.spans]).t().to(h.dtype)
            out = y_rows - base + f * (base + lora_out)
        else:
            base = y_rows if b_rows is None else y_rows - b_rows
            out = f * (base + lora_out) if b_rows is None else b_rows + f * (base + lora_out)
        return self._scatter(y, out.to(y.dtype))

    def _gather(self, t: torch.Tensor) -> torch.Tensor:
        """The enabled spans of t's last dim, side by side (a view when there is one span)."""
        if len(self.spans) == 1:
            a, b = self.spans[0]
            return t[..., a:b]
        return torch.cat([t[..., a:b] for a, b in self.spans], -1)

    def _scatter(self, y: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """y with its enabled spans replaced by `rows` (a new tensor: y may be a view of the frozen op's output)."""
        pieces, at, col = [], 0, 0
        for a, b in self.spans:
            if a > at:
                pieces.append(y[..., at:a])
            pieces.append(rows[..., col:col + b - a])
            at, col = b, col + b - a
        if at < y.shape[-1]:
            pieces.append(y[..., at:])
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, -1)

    def merge(self, sign: float = 1.0) -> None:
        w = self.base_layer.weight
        with zero.gathered([w, self.lora_A, self.lora_B, self.lora_magnitude_vector], modify=True) as writer:
            if writer:
                self._fold(w, sign)
        self.merged = sign > 0

    @torch.no_grad()
    def _fold(self, w: torch.Tensor, sign: float) -> None:
        W, m = self._rows(w.data), self.lora_magnitude_vector.detach().float().to(w.device)
        if sign > 0:
            self._merged_norm = self.row_norm(w)  # of the unmerged W0 + s B A, as the forward takes it
        elif self._merged_norm is None:
            raise BigadaptError("DoRA: unmerge needs the norm taken when this module was merged; reload the model")
        f = m / self._merged_norm.to(w.device)
        for (a, b), d, row in zip(self.spans, self._span_deltas(w.device), _starts(self.spans)):
            fi = f[row:row + b - a, None]
            if sign > 0:
                W[a:b] = (fi * (W[a:b].float() + d)).to(w.dtype)
            else:
                W[a:b] = (W[a:b].float() / fi - d).to(w.dtype)
        if sign < 0:
            self._merged_norm = None

    def full_magnitude(self) -> torch.Tensor:
        """m over the whole output, fp32, as peft holds it: a disabled slice's rows get their own ||W0||_row."""
        w = self.base_layer.weight
        with zero.gathered([w, self.lora_magnitude_vector]), torch.no_grad():
            full = torch.linalg.norm(self._rows(w).float(), dim=1)
            m = self.lora_magnitude_vector.detach().float().to(full.device)
            for (a, b), row in zip(self.spans, _starts(self.spans)):
                full[a:b] = m[row:row + b - a]
        return full.cpu().contiguous()

    def extra_repr(self) -> str:
        return super().extra_repr() + ", dora=True"


def _starts(spans) -> list[int]:
    """Where each span's rows begin in B (and in m)."""
    return [row for _, _, _, row in lora_branch._parts(spans)]
