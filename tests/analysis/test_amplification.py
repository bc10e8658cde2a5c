"""Table 7 / amplification factor on matrices with known answers."""
from __future__ import annotations

import pytest
import torch

from bigadapt.analysis.amplification import amplification_factor, projected_norm, table7_row, top_directions

D = 48


def svd_matrix(sigmas: torch.Tensor, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))[0]
    return U @ torch.diag(sigmas) @ V.T, U, V


def test_scaled_copy_of_top_direction():
    """ΔW = c u1 v1^T (W's top direction): ||U^T W V^T|| = σ1, amplification = c / σ1."""
    W, U, V = svd_matrix(torch.linspace(5, 0.1, D, dtype=torch.float64))
    dW = 3.0 * torch.outer(U[:, 0], V[:, 0])
    assert amplification_factor(W, dW) == pytest.approx(3.0 / 5.0, rel=1e-9)


def test_direction_weak_in_W_is_amplified():
    """ΔW on W's weakest direction (σ = 0.1) with norm 2: factor 20, the paper's r=4 regime."""
    W, U, V = svd_matrix(torch.linspace(5, 0.1, D, dtype=torch.float64))
    dW = 2.0 * torch.outer(U[:, -1], V[:, -1])
    assert amplification_factor(W, dW) == pytest.approx(20.0, rel=1e-9)


def test_table7_ordering_and_W_row():
    """W's own top-r directions capture sqrt(Σ top-r σ²); random ones capture ~ ||W|| sqrt(r²/d²)."""
    sig = torch.linspace(5, 0.1, D, dtype=torch.float64)
    W, U, V = svd_matrix(sig, 1)
    dW = 0.5 * U[:, 10:14] @ V[:, 10:14].T  # a rank-4 update on mid-spectrum directions
    row = table7_row(W, dW, 4)
    assert row["W"] == pytest.approx(float(sig[:4].square().sum().sqrt()), rel=1e-9)
    assert row["dW"] == pytest.approx(float(sig[10:14].square().sum().sqrt()), rel=1e-9)
    assert row["W"] > row["dW"] > row["random"]
    assert row["dW_norm"] == pytest.approx(1.0, rel=1e-9)  # 0.5 * sqrt(4)
    assert row["amplification"] == pytest.approx(row["dW_norm"] / row["dW"])


def test_zero_update_has_no_factor():
    W, _, _ = svd_matrix(torch.ones(D, dtype=torch.float64))
    assert torch.isnan(torch.tensor(table7_row(W, torch.zeros(D, D), 2)["amplification"]))


def test_projected_norm_is_invariant_to_sign_flips():
    W, _, _ = svd_matrix(torch.linspace(3, 1, D, dtype=torch.float64), 2)
    U, V = top_directions(W, 3)
    assert projected_norm(W, -U, V) == pytest.approx(projected_norm(W, U, V))
