"""Sensitivity matrices on disk: long CSV with header `layer,k,value`.

`layer` is the decoder-layer index of an MoE layer, `k` runs 1..K_orig, `value` is the cost of giving that layer k
experts (Algorithm 1: perplexity; LExI: output deviation). Every (layer, k) cell must be present exactly once.
"""

import csv
import io
import math
from pathlib import Path

import numpy as np

from ..errors import AllocMoeError
from ..io import atomic_write_text

HEADER = ["layer", "k", "value"]


def format_sensitivity(layers: list[int], S: np.ndarray) -> str:
    out = io.StringIO()
    out.write(",".join(HEADER) + "\n")
    for layer, row in zip(layers, np.asarray(S, dtype=np.float64)):
        for k, v in enumerate(row, start=1):
            out.write(f"{layer},{k},{float(v)!r}\n")
    return out.getvalue()


def write_sensitivity(path, layers: list[int], S: np.ndarray) -> None:
    atomic_write_text(path, format_sensitivity(layers, S))


def read_sensitivity(path) -> tuple[list[int], np.ndarray]:
    """Return (decoder-layer indices, S[L, K_orig]) or raise a one-line AllocMoeError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise AllocMoeError(f"sensitivity file not found: {path}") from None
    except (IsADirectoryError, UnicodeDecodeError) as e:
        raise AllocMoeError(f"cannot read sensitivity file {path}: {e}") from None
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or [c.strip() for c in rows[0]] != HEADER:
        got = rows[0] if rows else []
        raise AllocMoeError(
            f"{path}: header must be exactly 'layer,k,value' (comma-separated), got {','.join(got)!r}"
        )
    cells: dict[tuple[int, int], float] = {}
    for n, row in enumerate(rows[1:], start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != 3:
            raise AllocMoeError(f"{path}:{n}: expected 3 comma-separated fields layer,k,value, got {len(row)}")
        try:
            layer, k, value = int(row[0]), int(row[1]), float(row[2])
        except ValueError:
            raise AllocMoeError(f"{path}:{n}: layer and k must be integers and value a number, got {','.join(row)!r}") from None
        if layer < 0 or k < 1:
            raise AllocMoeError(f"{path}:{n}: layer must be >= 0 and k >= 1, got layer={layer} k={k}")
        if not math.isfinite(value):
            raise AllocMoeError(f"{path}:{n}: value must be finite, got {row[2]!r}")
        if (layer, k) in cells:
            raise AllocMoeError(f"{path}:{n}: duplicate cell layer={layer} k={k}")
        cells[(layer, k)] = value
    if not cells:
        raise AllocMoeError(f"{path}: no data rows")
    layers = sorted({layer for layer, _ in cells})
    k_orig = max(k for _, k in cells)
    missing = [(layer, k) for layer in layers for k in range(1, k_orig + 1) if (layer, k) not in cells]
    if missing:
        shown = ", ".join(f"(layer={a}, k={b})" for a, b in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise AllocMoeError(f"{path}: missing cells {shown}{more}; every layer needs k=1..{k_orig}")
    S = np.array([[cells[(layer, k)] for k in range(1, k_orig + 1)] for layer in layers])
    return layers, S
