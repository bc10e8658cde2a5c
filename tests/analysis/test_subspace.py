"""φ (eq. 4) and App. H.3 on synthetic matrices with known answers."""
from __future__ import annotations

import pytest
import torch

from bigadapt.analysis import heatmap
from bigadapt.analysis import subspace as sub
from bigadapt.analysis.subspace import Factors, phi, phi_grid, right_singular

D = 64


def orthonormal(d: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=g, dtype=torch.float64))[0]


def lora_A(basis: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """An r x d A whose row space is span(basis), with distinct singular values (a well-defined order)."""
    g = torch.Generator().manual_seed(seed)
    r = basis.shape[1]
    mix = torch.linalg.qr(torch.randn(r, r, generator=g, dtype=torch.float64))[0]
    return mix @ torch.diag(torch.arange(r, 0, -1, dtype=torch.float64)) @ basis.T


def test_same_row_space_is_one_for_every_cell():
    basis = orthonormal(D, 8)
    U_A, U_B = right_singular(lora_A(basis, 1)), right_singular(lora_A(basis, 2))
    # i = j = r spans the same space whatever the order; other cells depend on the singular-value order
    assert phi(U_A, U_B, 8, 8) == pytest.approx(1.0, abs=1e-9)
    assert phi(U_A, U_A, 3, 5) == pytest.approx(1.0, abs=1e-9)


def test_orthogonal_row_spaces_score_zero():
    Q = orthonormal(D, 16)
    grid = phi_grid(right_singular(lora_A(Q[:, :8])), right_singular(lora_A(Q[:, 8:])))
    assert grid.abs().max() < 1e-12


def test_nested_subspaces_score_one():
    """U_A^i inside span U_B^j (i <= j): φ = 1, the r=8-inside-r=64 case of Fig. 3."""
    Q = orthonormal(D, 32)
    A_small = lora_A(Q[:, :4])  # row space = first 4 columns
    A_big = torch.diag(torch.arange(32, 0, -1, dtype=torch.float64)) @ Q.T  # top-4 right vectors = Q[:, :4]
    grid = phi_grid(right_singular(A_small), right_singular(A_big))
    assert grid[3, 3:].min() == pytest.approx(1.0, abs=1e-9)  # i = 4 (all of A_small) against any j >= 4
    assert grid[0, 3] == pytest.approx(1.0, abs=1e-9)  # i = 1 inside the top 4 of A_big


def test_random_pair_matches_expectation():
    d, i, j, n = 128, 4, 16, 200
    vals = [phi(orthonormal(d, i, 2 * s), orthonormal(d, j, 2 * s + 1), i, j) for s in range(n)]
    expected = sub.random_expectation(i, j, d)  # i*j/d/min = 16/128 = 0.125
    assert sum(vals) / n == pytest.approx(expected, rel=0.1)


def test_grid_equals_direct_formula():
    U_A, U_B = orthonormal(D, 5, 3), orthonormal(D, 7, 4)
    grid = phi_grid(U_A, U_B)
    for i in range(1, 6):
        for j in range(1, 8):
            assert grid[i - 1, j - 1] == pytest.approx(phi(U_A, U_B, i, j), abs=1e-12)
    assert float(grid.min()) >= 0 and float(grid.max()) <= 1 + 1e-12


def test_right_not_left_singular_vectors_of_A():
    """A is r x d_in: its left-singular vectors live in R^r, so only the right ones compare across adapters."""
    A = lora_A(orthonormal(D, 4))
    assert right_singular(A).shape == (D, 4) and sub.left_singular(A).shape == (4, 4)


def _factors(A: torch.Tensor, B: torch.Tensor, W: torch.Tensor) -> Factors:
    return Factors("l0", A.float(), B.float(), 2.0, W.float())


def test_delta_w_basis_uses_column_space_of_BA():
    Q, P = orthonormal(D, 8, 5), orthonormal(D, 8, 6)
    B_shared = orthonormal(D, 4, 7)
    W = torch.eye(D)
    fa = {"l0": _factors(lora_A(Q[:, :4]), B_shared, W)}
    fb = {"l0": _factors(lora_A(P[:, :4]), B_shared @ torch.diag(torch.tensor([4.0, 3, 2, 1], dtype=torch.float64)),
                         W)}
    # different row spaces of A, same column space of ΔW
    assert sub.subspace_similarity(fa, fb, "dW")["l0"][-1, -1] == pytest.approx(1.0, abs=1e-5)
    assert sub.subspace_similarity(fa, fb, "A")["l0"][-1, -1] < 0.5


def test_delta_vs_base_h3():
    U, V = orthonormal(D, D, 8), orthonormal(D, D, 9)
    W = U @ torch.diag(torch.linspace(10, 1, D, dtype=torch.float64)) @ V.T
    aligned = _factors(V[:, :2].T, U[:, :2], W)  # ΔW's column space = W's top-2 left directions
    orthogonal = _factors(V[:, -2:].T, U[:, -2:], W)  # W's bottom directions
    assert sub.delta_vs_base(aligned) == pytest.approx(1.0, abs=1e-5)
    assert sub.delta_vs_base(orthogonal) == pytest.approx(0.0, abs=1e-5)


def test_lora_factors_split_fused_c_attn_and_rebuild_delta():
    from bigadapt import methods
    from bigadapt import model as base_model
    from bigadapt.config import config_from_dict
    from tests.conftest import TINY_GPT2
    cfg = config_from_dict({"model": {"arch": TINY_GPT2, "objective": "causal_lm"},
                            "method": {"r": 4, "alpha": 8, "targets": ["q", "v"]}})
    model = base_model.build_base(cfg.model, 0)
    W0 = model.transformer.h[0].attn.c_attn.weight.detach().clone().T
    methods.apply(model, cfg)
    for _, m in methods.get("lora").lora_modules(model):
        torch.nn.init.normal_(m.lora_B)
    f = sub.lora_factors(model)
    assert sorted(f)[:2] == ["transformer.h.0.attn.c_attn[q]", "transformer.h.0.attn.c_attn[v]"]
    m = model.transformer.h[0].attn.c_attn
    full = m.delta_weight().T  # [out, in]
    assert torch.allclose(f["transformer.h.0.attn.c_attn[v]"].delta.float(), full[128:], atol=1e-5)
    assert torch.allclose(f["transformer.h.0.attn.c_attn[q]"].W, W0[:64])
    methods.get("lora").merge(model)  # merged: W is still the frozen base, not base + ΔW
    assert torch.allclose(sub.lora_factors(model)["transformer.h.0.attn.c_attn[q]"].W, W0[:64], atol=1e-5)


def test_heat_maps_have_axes_a_colour_bar_and_a_title(tmp_path):
    from PIL import Image
    fig = heatmap.heat_maps(tmp_path / "phi.png", {"q": torch.rand(4, 8), "v": torch.rand(4, 8)}, "φ test")
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert [ax.get_title() for ax in panels] == ["q", "v"] and fig._suptitle.get_text() == "φ test"
    assert all(ax.get_xlabel() == "j" and ax.get_ylabel() == "i" for ax in panels)
    assert [t.get_text() for t in panels[0].get_xticklabels()][0] == "1"  # 1-based
    assert any(ax.get_label() == "<colorbar>" for ax in fig.axes)
    with Image.open(tmp_path / "phi.png") as im:
        assert im.format == "PNG" and im.width > 300 and im.height > 150
    heatmap.heat_maps(tmp_path / "phi.svg", {"q": torch.rand(2, 2)}, "svg")
    heatmap.heat_maps(tmp_path / "phi.pdf", {"q": torch.rand(2, 2)}, "pdf")
    assert (tmp_path / "phi.svg").read_text().lstrip().startswith("<?xml")
    assert (tmp_path / "phi.pdf").read_bytes()[:4] == b"%PDF"
