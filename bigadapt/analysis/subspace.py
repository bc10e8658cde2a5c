"""Subspace similarity φ between LoRA updates (LoRA paper §7.2, eq. 4, App. G, App. H.3).

    φ(A, B, i, j) = ||U_A^{i T} U_B^j||_F^2 / min(i, j)  in [0, 1]

U_A^i are the top-i singular vectors of one adapter's matrix, U_B^j the top-j of another's. The paper names
the basis twice and differently: "right-singular unitary matrices" of A (§7.2) and "left singular matrices"
(App. G). LoRA's A is r x d_in, so its left singular vectors live in R^r (a basis of the rank dimension, which
no two adapters share); the meaningful comparison is in R^{d_in}, i.e. the right-singular vectors of A (its
row space). That is what the authors' analysis code does and what `basis="A"` computes here. `basis="dW"`
instead compares the column spaces of ΔW = (α/r) B A (left-singular vectors, in R^{d_out}), the output
directions the update writes to. Σσ_k^2/p = 1 - d^2/p for the projection metric d (the extracted text's
"(1/p)(1 - d^2)" is an extraction slip).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import targets as tg
from ..methods.lora import lora_modules


def right_singular(M: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """Top-k right-singular vectors of M as columns (d_in x k): an orthonormal basis of M's row space."""
    _, _, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    return Vh[:k].T if k else Vh.T


def left_singular(M: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """Top-k left-singular vectors of M as columns (d_out x k): an orthonormal basis of M's column space."""
    U, _, _ = torch.linalg.svd(M.double(), full_matrices=False)
    return U[:, :k] if k else U


def phi(U_A: torch.Tensor, U_B: torch.Tensor, i: int, j: int) -> float:
    """Eq. 4 on orthonormal column bases: the normalised overlap of span(U_A[:, :i]) and span(U_B[:, :j])."""
    return float((U_A[:, :i].T @ U_B[:, :j]).square().sum() / min(i, j))


def phi_grid(U_A: torch.Tensor, U_B: torch.Tensor) -> torch.Tensor:
    """φ for every 1 <= i <= cols(U_A), 1 <= j <= cols(U_B); entry [i-1, j-1] (Fig. 3's heat map).

    Cumulative sums of the squared overlaps give the whole grid from one product, not i*j products."""
    overlap = (U_A.T @ U_B).square()  # [i, j] = <u_i, v_j>^2
    cum = overlap.cumsum(0).cumsum(1)
    i = torch.arange(1, U_A.shape[1] + 1, dtype=cum.dtype)[:, None]
    j = torch.arange(1, U_B.shape[1] + 1, dtype=cum.dtype)[None, :]
    return cum / torch.minimum(i, j)


def random_expectation(i: int, j: int, d: int) -> float:
    """E[φ] for independent uniformly random subspaces of R^d: E||P_i Q_j||_F^2 = i*j/d, over min(i, j)."""
    return i * j / d / min(i, j)


@dataclass
class Factors:
    """One adapted projection (a paper matrix such as layer 3's W_q), in the [out, in] layout."""
    key: str  # e.g. "transformer.h.3.attn.c_attn[q]"
    A: torch.Tensor  # r x d_in
    B: torch.Tensor  # d_out x r
    scaling: float
    W: torch.Tensor  # frozen base weight of this projection, d_out x d_in (the slice, on a fused module)

    @property
    def delta(self) -> torch.Tensor:
        return self.scaling * (self.B.double() @ self.A.double())


def lora_factors(model: nn.Module) -> dict[str, Factors]:
    """Per paper projection: (A_i, B_i, scaling, W) of every LoRA module; fused slices split apart."""
    out = {}
    for name, m in lora_modules(model):
        A, B = m.lora_A.detach().float().cpu(), m.lora_B.detach().float().cpu()
        W = m.base_layer.weight.detach().float().cpu()
        W = W.T if m.fan_in_fan_out else W  # Conv1D stores [in, out]
        if m.merged:
            W = W - m.delta_weight().cpu().T if m.fan_in_fan_out else W - m.delta_weight().cpu()
        row = 0
        for s, (a, b) in enumerate(m.spans):
            whole = (a, b) == (0, m.out_features)
            key = name if whole else f"{name}[{_paper_name(model, name, a, b)}]"
            out[key] = Factors(key, A[s * m.r:(s + 1) * m.r], B[row:row + b - a], m.scaling, W[a:b])
            row += b - a
    return out


def _paper_name(model: nn.Module, name: str, a: int, b: int) -> str:
    """The paper name (q, k, v) of a fused slice, from the targets table; else its slice index."""
    part = a // (b - a)
    for paper, (regex, idx) in tg.ARCHS.get(tg.model_type(model), {}).items():
        if idx == part and re.search(regex, name):
            return paper
    return str(part)


def subspace_similarity(fa: dict[str, Factors], fb: dict[str, Factors], basis: str = "A") -> dict[str, torch.Tensor]:
    """φ grid per projection present in both adapters. basis "A": right-singular vectors of A (row space,
    §7.2); "dW": left-singular vectors of ΔW = BA (column space)."""
    grids = {}
    for key in fa.keys() & fb.keys():
        a, b = fa[key], fb[key]
        if basis == "A":
            U_A, U_B = right_singular(a.A), right_singular(b.A)
        else:
            U_A, U_B = left_singular(a.delta, a.A.shape[0]), left_singular(b.delta, b.A.shape[0])
        grids[key] = phi_grid(U_A, U_B)
    return dict(sorted(grids.items(), key=lambda kv: _natural(kv[0])))


def delta_vs_base(f: Factors, i: int | None = None, frac: float = 0.1) -> float:
    """App. H.3: φ between the top-i left-singular directions of ΔW and the top frac*d of W's (Fig. 8).

    A random i-dim subspace scores frac on average, so a value near frac means ΔW ignores W's top directions."""
    i = i or f.A.shape[0]
    j = max(1, round(frac * min(f.W.shape)))
    return phi(left_singular(f.delta, i), left_singular(f.W, j), i, j)


def _natural(key: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def load_factors(run: str, untrained: bool = False) -> tuple[dict[str, Factors], dict]:
    """A run or checkpoint directory -> its LoRA factors and run config (CPU, no DeepSpeed). untrained=True:
    the factors the run started from (A as its seed drew it, B = 0): the control for what training changed."""
    from ..errors import BigadaptError
    from ..export import load_trained
    model, _, cfg = load_trained(run, untrained)
    if cfg.method.name not in ("lora", "lora+pe", "lora+pl"):
        raise BigadaptError(f"{run}: subspace analysis needs a LoRA run; this one used {cfg.method.name!r}")
    return lora_factors(model), cfg.to_dict()


def report(run_a: str, run_b: str, png: str | None = None) -> int:
    """`bigadapt analyze subspace RUN_A RUN_B`: φ per projection (both bases), App. H.3, optional heat map."""
    fa, cfg_a = load_factors(run_a)
    fb, cfg_b = load_factors(run_b)
    grids = {basis: subspace_similarity(fa, fb, basis) for basis in ("A", "dW")}
    if not grids["A"]:
        from ..errors import BigadaptError
        raise BigadaptError(f"{run_a} and {run_b} adapt no projection in common; compare runs with shared targets")
    ra, rb = cfg_a["method"]["r"], cfg_b["method"]["r"]
    print(f"φ(A, B, i, j) over right-singular vectors of LoRA A (row space, §7.2) and over column spaces of ΔW; "
          f"r_A={ra}, r_B={rb}; random subspaces of dim i, j in R^d score i*j/d/min(i,j)")
    print(f"{'projection':40s} {'φ(1,1) A':>9s} {'φ(1,1) ΔW':>10s} {'φ(rA,rB) A':>11s} {'rand':>6s} "
          f"{'ΔW·W top10% (a, b)':>19s}")
    for key, g in grids["A"].items():
        d = fa[key].A.shape[1]
        rand = random_expectation(g.shape[0], g.shape[1], d)
        h3 = f"{delta_vs_base(fa[key]):.3f}, {delta_vs_base(fb[key]):.3f}"
        print(f"{key:40s} {g[0, 0]:9.3f} {grids['dW'][key][0, 0]:10.3f} {g[-1, -1]:11.3f} {rand:6.3f} {h3:>19s}")
    if png:
        from .heatmap import figure_path, heat_maps
        heat_maps(png, grids["A"], f"φ(A_r={ra}, A_r={rb}, i, j): {Path(run_a).name} vs {Path(run_b).name} (basis A)")
        print(f"wrote {figure_path(png)}: one {ra}x{rb} φ grid (basis A) per projection, in the order above; "
              f"rows i = 1..{ra}, columns j = 1..{rb}")
    return 0
