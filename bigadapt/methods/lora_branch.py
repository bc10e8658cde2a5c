"""LoRA's branch, y + s (x A^T) B^T on the given output spans, as one autograd Function with its backward
written out.

Why not autograd's own backward: the branch's gradients are thin products, with [N, r] and [out, r]
results. Autograd — and DeepSpeed's ZeRO-3 linear, which replaces F.linear for the whole process — forms
them as g @ B and g^T h, which MKL computes ~4x slower on a CPU than the same products taken transposed,
(B^T g^T)^T and (h^T g)^T: 340 vs 80 µs each at N = 256, out = 1152, r = 8 on one thread. The products
are the same; one node instead of four also saves autograd dispatches.

In training the sum is a new tensor, never the frozen op's output written in place: that output is a view
under GPT-2's Conv1D, and autograd backs an in-place write to a view with copies of the whole output in
backward (three [N, out] copies and a zero fill per call, more than the branch itself costs). With no
gradient to record, the sum goes into that output in place: no copy of it at all.

Under ZeRO-3, A and B are the calling LoRA module's own parameters, so DeepSpeed's module hooks have them
whole in this forward and, gathered again before the module's backward, in this backward.
"""
from __future__ import annotations

import torch


def add(y: torch.Tensor, x: torch.Tensor, A, B, scaling: float, spans: tuple, r: int) -> torch.Tensor:
    """y + s (x A^T) B^T on the spans of y's last dim. With no gradient to record (evaluation, serving
    unmerged) the sum goes into y in place; in training, through the Function below."""
    if torch.is_grad_enabled() and (y.requires_grad or x.requires_grad or A.requires_grad or B.requires_grad):
        return LoRABranch.apply(y, x, A, B, scaling, spans, r)
    return _sum(y.reshape(-1, y.shape[-1]), x.reshape(-1, x.shape[-1]), A, B, scaling, spans, r,
                inplace=True)[0].view(y.shape)


def _sum(y2, x2, A, B, scaling: float, spans: tuple, r: int, inplace: bool):
    """(y2 + the branch, the [N, spans * r] hidden s x A^T) on 2-d views."""
    h = torch.mm(x2, A.t()).mul_(scaling)  # scaled here: r columns, not out
    if not inplace and len(spans) == 1 and spans[0] == (0, y2.shape[1]):  # one pass over the output, no clone
        if y2.dtype == B.dtype:
            return torch.addmm(y2, h, B.t()), h  # the sum in the product's own pass
        return y2 + torch.mm(h, B.t()).to(y2.dtype), h  # a bf16 base under an fp32 adapter
    out = y2 if inplace else y2.clone()
    for i, a, b, row in _parts(spans):
        hi, Bi = h[:, i * r:(i + 1) * r], B[row:row + b - a]
        if out.dtype == Bi.dtype:
            out[:, a:b].addmm_(hi, Bi.t())
        else:
            out[:, a:b] += (hi @ Bi.t()).to(out.dtype)
    return out, h


class LoRABranch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, x, A, B, scaling: float, spans: tuple, r: int):
        x2 = x.reshape(-1, x.shape[-1])
        out, h = _sum(y.reshape(-1, y.shape[-1]), x2, A, B, scaling, spans, r, inplace=False)
        ctx.save_for_backward(x2, A, B, h)
        ctx.spans, ctx.r, ctx.scaling, ctx.x_shape = spans, r, scaling, x.shape
        return out.view(y.shape)

    @staticmethod
    def backward(ctx, g):
        x2, A, B, h = ctx.saved_tensors
        _, need_x, need_A, need_B = ctx.needs_input_grad[:4]
        g2 = g.reshape(-1, g.shape[-1]).to(B.dtype)
        gh = torch.empty_like(h)
        gB = torch.empty_like(B) if need_B else None
        r = ctx.r
        for i, a, b, row in _parts(ctx.spans):
            gi, cols, rows = g2[:, a:b], slice(i * r, (i + 1) * r), slice(row, row + b - a)
            # the [n, r] and [N, r] products computed as their transposes: MKL's fast layout
            if need_B:
                gB[rows] = torch.mm(h[:, cols].t(), gi).t()
            gh[:, cols] = torch.mm(B[rows].t(), gi.t()).t()
        gh.mul_(ctx.scaling)
        gA = torch.mm(gh.t(), x2) if need_A else None
        gx = torch.mm(gh, A).view(ctx.x_shape) if need_x else None
        return g, gx, gA, gB, None, None, None


def _parts(spans):
    """(i, start, stop, row) per span: (A_i, B_i) writes output columns start:stop; B_i starts at B's row."""
    row = 0
    for i, (a, b) in enumerate(spans):
        yield i, a, b, row
        row += b - a
