"""A φ heat-map PNG written with the standard library only (zlib + struct): matplotlib is not a dependency.

Each grid cell becomes a `cell` x `cell` pixel block, coloured by a 5-stop viridis-like map over [0, 1];
several grids are stacked top to bottom with a white gap. No axes or text: the caller prints the legend.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import torch

# viridis at 0, .25, .5, .75, 1 (dark purple = separated subspaces, yellow = the same subspace)
STOPS = [(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)]


def color(v: float) -> tuple[int, int, int]:
    v = min(1.0, max(0.0, v)) * (len(STOPS) - 1)
    k = min(int(v), len(STOPS) - 2)
    t = v - k
    return tuple(round(a + (b - a) * t) for a, b in zip(STOPS[k], STOPS[k + 1]))


def rows_of(grids: list[torch.Tensor], cell: int, gap: int) -> list[bytes]:
    width = max(g.shape[1] for g in grids) * cell
    white = bytes([255] * 3 * width)
    out: list[bytes] = []
    for g in grids:
        for i in range(g.shape[0]):
            line = b"".join(bytes(color(float(v))) * cell for v in g[i])
            line += bytes([255] * (3 * width - len(line)))
            out += [line] * cell
        out += [white] * gap
    return out[:-gap] if gap else out


def write_png(path: str | Path, grids: list[torch.Tensor], cell: int = 8, gap: int = 4) -> None:
    rows = rows_of(grids, cell, gap)
    width, height = len(rows[0]) // 3, len(rows)
    raw = b"".join(b"\x00" + r for r in rows)  # filter type 0 per scanline

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9))
                           + chunk(b"IEND", b""))
