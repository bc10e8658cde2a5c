"""The report of `bigadapt bench section7`: Fig. 3, Fig. 4, Table 7 and App. H.3 as Markdown tables.

Every subspace number comes with its control: the same number for the adapters as their runs initialised
them (A drawn again from each run's seed; B = 0, so there is no ΔW yet) and, where it has one, the value
two random subspaces score. A's init is a random r x d matrix, so φ over A's row space measures what
training added only where the trained value leaves the control behind.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from ..analysis import amplification, subspace
from ..analysis.subspace import Factors
from ..errors import BigadaptError
from .section7 import RUNS
from .study import complete, run_evals

FIG3, FIG4, TABLE7 = ("r8", "r64"), ("r64", "r64-seed1"), ("r4", "r64")


def find_runs(out: Path) -> dict[str, Path]:
    """name in RUNS -> run directory, for every complete run the driver wrote into `out`."""
    runs = {}
    for path in sorted(out.glob("*.yaml")):
        name = path.stem.split("-lora-", 1)[-1]
        run_dir = Path(yaml.safe_load(path.read_text())["run_dir"])
        if name in RUNS and complete(run_dir):
            runs[name] = run_dir
    return {n: runs[n] for n in RUNS if n in runs}


def moved(trained: Factors, init: Factors) -> float:
    """||A - A_0||_F / ||A_0||_F: how far training took A from its init."""
    return float((trained.A - init.A).norm() / init.A.norm())


def runs_table(runs: dict[str, Path], cfgs: dict, trained: dict, init: dict) -> str:
    lines = ["| run | r | seed | steps | final eval | mean ‖A−A₀‖/‖A₀‖ | mean ‖ΔW‖/‖W‖ |",
             "| --- | ---: | ---: | ---: | --- | ---: | ---: |"]
    for name, run_dir in runs.items():
        ev = run_evals(run_dir)[-1]
        shown = ", ".join(f"{k} {v:.3f}" for k, v in ev.items() if k not in ("step", "split", "train_s"))
        keys = list(trained[name])
        a = sum(moved(trained[name][k], init[name][k]) for k in keys) / len(keys)
        w = sum(float(trained[name][k].delta.norm() / trained[name][k].W.norm()) for k in keys) / len(keys)
        r, seed = cfgs[name]["method"]["r"], cfgs[name]["train"]["seed"]
        lines.append(f"| {name} | {r} | {seed} | {ev['step']} | {shown} | {a:.3f} | {w:.4f} |")
    return "\n".join(lines)


def phi_table(pair: tuple[str, str], trained: dict, init: dict, cells: list[tuple[int, int]]) -> tuple[str, dict]:
    """φ over A's row space at `cells` (trained, then the init control, then random subspaces), and φ(1,1)
    over ΔW's column space. Returns the table and the trained A-basis grids (for the heat map)."""
    a, b = pair
    g_t, g_0 = subspace.subspace_similarity(trained[a], trained[b]), subspace.subspace_similarity(init[a], init[b])
    g_dw = subspace.subspace_similarity(trained[a], trained[b], "dW")
    d = next(iter(trained[a].values())).A.shape[1]
    head = " | ".join(f"φ({i},{j})" for i, j in cells)
    lines = [f"| projection | {head} | init φ(1,1) | init φ({cells[-1][0]},{cells[-1][1]}) | ΔW φ(1,1) |",
             "| --- | " + " | ".join("---:" for _ in range(len(cells) + 3)) + " |",
             "| random subspaces | " + " | ".join(f"{subspace.random_expectation(i, j, d):.3f}" for i, j in cells)
             + f" | {subspace.random_expectation(1, 1, d):.3f} | "
             f"{subspace.random_expectation(*cells[-1], d):.3f} | {subspace.random_expectation(1, 1, d):.3f} |"]
    for key, g in g_t.items():
        vals = " | ".join(f"{g[i - 1, j - 1]:.3f}" for i, j in cells)
        i, j = cells[-1]
        lines.append(f"| {key} | {vals} | {g_0[key][0, 0]:.3f} | {g_0[key][i - 1, j - 1]:.3f} | "
                     f"{g_dw[key][0, 0]:.3f} |")
    return "\n".join(lines), g_t


def table7_table(trained: dict) -> str:
    """Table 7 per projection at r = 4 and r = 64, with App. H.3's φ(ΔW top r, W top 10%)."""
    rows = {name: amplification.table7(trained[name]) for name in TABLE7}
    cols = " | ".join(f"{n}: {c}" for n in TABLE7 for c in ("ΔW", "W", "random", "‖ΔW‖", "amplif."))
    lines = [f"| projection | ‖W‖ | {cols} | H.3 {TABLE7[0]} (random 0.1) |",
             "| --- | ---: | " + " | ".join("---:" for _ in range(5 * len(TABLE7) + 1)) + " |"]
    for key in rows[TABLE7[0]]:
        vals = " | ".join(f"{t['dW']:.3f} | {t['W']:.3f} | {t['random']:.3f} | {t['dW_norm']:.3f} | "
                          f"{t['amplification']:.2f}" for t in (rows[n][key] for n in TABLE7))
        h3 = subspace.delta_vs_base(trained[TABLE7[0]][key])
        lines.append(f"| {key} | {rows[TABLE7[0]][key]['W_norm']:.2f} | {vals} | {h3:.3f} |")
    return "\n".join(lines)


def report(out: Path, png: str | None = None, fmt: str = "png") -> int:
    runs = find_runs(out)
    missing = [n for n in RUNS if n not in runs]
    if missing:
        raise BigadaptError(f"{out}: no complete run for {', '.join(missing)}; "
                            f"run `bigadapt bench section7 run --out {out} ...` first")
    loaded = {n: subspace.load_factors(str(d)) for n, d in runs.items()}
    trained, cfgs = {n: f for n, (f, _) in loaded.items()}, {n: c for n, (_, c) in loaded.items()}
    init = {n: subspace.load_factors(str(d), untrained=True)[0] for n, d in runs.items()}
    print("## Runs\n\n" + runs_table(runs, cfgs, trained, init))
    fig3, g3 = phi_table(FIG3, trained, init, [(1, 1), (2, 2), (4, 4), (8, 8), (8, 64)])
    print(f"\n## Fig. 3: φ(A_r=8, A_r=64, i, j), right-singular vectors of A\n\n{fig3}")
    fig4, g4 = phi_table(FIG4, trained, init, [(1, 1), (4, 4), (8, 8), (16, 16), (64, 64)])
    print(f"\n## Fig. 4: φ(A_r=64, A'_r=64, i, j), two seeds\n\n{fig4}")
    print("\n## Table 7: ‖UᵀWVᵀ‖_F for the top-r directions of ΔW, W and a random matrix\n\n" + table7_table(trained))
    if png:
        from ..analysis.heatmap import figure_path, heat_maps
        titles = {"fig3": "Fig. 3: φ(A_r=8, A_r=64, i, j)", "fig4": "Fig. 4: φ(A_r=64, A'_r=64, i, j), two seeds"}
        paths = []
        for fig, grids in (("fig3", g3), ("fig4", g4)):
            heat_maps(f"{png}-{fig}.{fmt}", grids, titles[fig])
            paths.append(str(figure_path(f"{png}-{fig}.{fmt}")))
        print(f"\nheat maps: {', '.join(paths)} (one panel per projection, in the tables' order)")
    return 0
