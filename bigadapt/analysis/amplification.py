"""How much ΔW amplifies directions W already has (LoRA paper §7.3, Table 7, App. H.4).

For an r-dim direction pair (U, V) (U: d_out x r left, V: r x d_in right singular vectors), ||U^T W V^T||_F
measures how much of W lies in that subspace. Table 7 compares U, V taken from (1) ΔW, (2) W itself and
(3) a random matrix; the amplification factor is ||ΔW||_F / ||U^T W V^T||_F with U, V from ΔW: about 21.5
at r = 4 for GPT-3's W_q (6.91 / 0.32), only ~2 at r = 64.
"""
from __future__ import annotations

import torch

from .subspace import Factors


def top_directions(M: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, V): the top-r left singular vectors as columns (d_out x r), right ones as rows (r x d_in)."""
    U, _, Vh = torch.linalg.svd(M.double(), full_matrices=False)
    return U[:, :r], Vh[:r]


def projected_norm(W: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> float:
    """||U^T W V^T||_F: the part of W in the (U, V) subspace."""
    return float(torch.linalg.matrix_norm(U.T @ W.double() @ V.T))


def amplification_factor(W: torch.Tensor, dW: torch.Tensor, r: int | None = None) -> float:
    """||ΔW||_F / ||U^T W V^T||_F with U, V the top-r singular vectors of ΔW (r defaults to rank-of-LoRA)."""
    r = r or int(torch.linalg.matrix_rank(dW.double()))
    U, V = top_directions(dW, r)
    return float(torch.linalg.matrix_norm(dW.double())) / projected_norm(W, U, V)


def table7_row(W: torch.Tensor, dW: torch.Tensor, r: int, seed: int = 0) -> dict[str, float]:
    """One Table 7 column group: ||U^T W V^T||_F for U, V from ΔW, from W and from a random matrix, with the
    norms and the amplification factor."""
    g = torch.Generator().manual_seed(seed)
    rand = torch.randn(W.shape, generator=g, dtype=torch.float64)
    row = {name: projected_norm(W, *top_directions(M, r)) for name, M in (("dW", dW), ("W", W), ("random", rand))}
    dW_norm = float(torch.linalg.matrix_norm(dW.double()))
    return {"r": r, **row, "dW_norm": dW_norm, "W_norm": float(torch.linalg.matrix_norm(W.double())),
            "amplification": dW_norm / row["dW"] if dW_norm > 0 else float("nan")}  # B = 0: no update yet


def table7(factors: dict[str, Factors], seed: int = 0) -> dict[str, dict[str, float]]:
    """Table 7 for every adapted projection of one adapter, r = its LoRA rank."""
    return {key: table7_row(f.W, f.delta, f.A.shape[0], seed) for key, f in factors.items()}


def report(run: str) -> int:
    """`bigadapt analyze amplification RUN`: Table 7 per adapted projection of a trained LoRA run."""
    from .subspace import load_factors
    factors, _ = load_factors(run)
    print("||U^T W V^T||_F for the top-r singular directions of ΔW, of W, and of a random matrix (Table 7); "
          "amplification = ||ΔW||_F / (the ΔW column)")
    cols = ("r", "ΔW", "W", "random", "||ΔW||", "||W||", "amplif.")
    print(f"{'projection':40s} " + " ".join(f"{c:>{3 if c == 'r' else 8}s}" for c in cols))
    for key, t in table7(factors).items():
        print(f"{key:40s} {t['r']:3d} {t['dW']:8.4f} {t['W']:8.3f} {t['random']:8.4f} {t['dW_norm']:8.4f} "
              f"{t['W_norm']:8.3f} {t['amplification']:8.2f}")
    return 0
