"""Seeded signed bucket hashes (the count sketch's h and s), shared by ``sketch`` and ``countsketch``.

Row r maps coordinate j to a bucket ``h_r(j)`` in [0, cols) and a sign ``s_r(j)`` in {-1, +1},
both drawn from the seed (fully random, not a universal hash family; each chunk of 65,536
coordinates from its own generator), stored together as one
code ``2 h_r(j) + (s_r(j) < 0)``. Sketching is then one scatter-add into 2*cols buckets
followed by ``even - odd`` (no per-value sign multiply), and reading a bucket back with its
sign is one gather from the interleaved table ``(t, -t)``. Client and server draw the same
codes from the same seed, chunk by chunk while they sketch (``sketch_chunked``,
``transpose_chunked``, ``median_chunked``): 65,536 codes stay in the CPU's cache instead of
8 bytes a value and row going through memory, and nothing of size d is stored.
``signed_hashes`` builds all the codes at once, for tests and readers.
"""

from __future__ import annotations

import torch

from .codec import generator



CHUNK = 1 << 16  # coordinates per chunk of codes: each chunk has its own generator


def _chunk_codes(seed: int, index: int, n: int, cols: int, rows: int, device: torch.device | None = None) -> torch.Tensor:
    """Drawn on the CPU (the same codes on every device), then moved to ``device``."""
    g = generator((int(seed) * 1_000_003 + index) % (2**63))
    codes = torch.randint(0, 2 * cols, (rows, n), generator=g)
    return codes if device is None else codes.to(device)


def signed_hashes(seed: int, d: int, cols: int, rows: int = 1) -> torch.Tensor:
    """Codes (int64, (rows, d)) in [0, 2*cols): bucket = code // 2, sign = -1 if code is odd.
    Drawn chunk by chunk (``CHUNK`` coordinates each), as ``sketch_chunked`` draws them."""
    return torch.cat([_chunk_codes(seed, i, min(CHUNK, d - s), cols, rows)
                      for i, s in enumerate(range(0, d, CHUNK))], dim=1)


def sketch_chunked(x: torch.Tensor, seed: int, cols: int, rows: int = 1) -> torch.Tensor:
    """``sketch_rows(x, signed_hashes(seed, ...), cols)`` drawing the codes chunk by chunk as it goes (they
    stay in cache and are never stored: what a client does with a sketch that changes every round)."""
    both = torch.zeros(rows, 2 * cols, device=x.device)
    for i, s in enumerate(range(0, x.numel(), CHUNK)):  # chunks of 65,536 values
        part = x[s:s + CHUNK]
        codes = _chunk_codes(seed, i, part.numel(), cols, rows, x.device)
        for r in range(rows):
            both[r].index_add_(0, codes[r], part)
    return both[:, 0::2] - both[:, 1::2]


def _signed_chunks(table: torch.Tensor, seed: int, d: int):
    """For each chunk of the d coordinates: (start, length, codes, the table with its negated copy
    interleaved), so that ``signed[r].index_select(0, codes[r])`` is s_r(j) table[r, h_r(j)]."""
    rows, cols = table.shape
    signed = torch.stack([table, -table], dim=2).view(rows, -1)
    for i, s in enumerate(range(0, d, CHUNK)):
        n = min(CHUNK, d - s)
        yield s, n, _chunk_codes(seed, i, n, cols, rows, table.device), signed


def transpose_chunked(table: torch.Tensor, seed: int, d: int) -> torch.Tensor:
    """sum over rows r of s_r(j) table[r, h_r(j)], for every j (the transpose of the sketch), chunked."""
    out = torch.empty(d, device=table.device)
    for s, n, codes, signed in _signed_chunks(table, seed, d):
        dst = out[s:s + n]
        torch.index_select(signed[0], 0, codes[0], out=dst)
        for r in range(1, len(codes)):
            dst.add_(signed[r].index_select(0, codes[r]))
    return out


def median_chunked(table: torch.Tensor, seed: int, d: int) -> torch.Tensor:
    """Per coordinate j, the median over rows r of s_r(j) table[r, h_r(j)] (the count sketch's estimate),
    chunked like ``transpose_chunked``."""
    out = torch.empty(d, device=table.device)
    for s, n, codes, signed in _signed_chunks(table, seed, d):
        out[s:s + n] = median_rows([signed[r].index_select(0, codes[r]) for r in range(len(codes))])
    return out


def buckets_and_signs(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The codes as (buckets, signs in {-1., +1.}) (for tests and readers)."""
    return codes >> 1, 1.0 - 2.0 * (codes & 1).float()


def sketch_row(x: torch.Tensor, codes: torch.Tensor, cols: int) -> torch.Tensor:
    """One row of the count sketch: t[c] = sum over h(j) = c of s(j) x_j."""
    both = torch.zeros(2 * cols, device=x.device).index_add_(0, codes, x)
    return both[0::2] - both[1::2]


def read_row(row: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """s(j) * row[h(j)] for every j."""
    return torch.stack([row, -row], dim=1).view(-1).index_select(0, codes)


def sketch_rows(x: torch.Tensor, codes: torch.Tensor, cols: int) -> torch.Tensor:
    """The count-sketch table (rows, cols)."""
    return torch.stack([sketch_row(x, c, cols) for c in codes])  # a handful of rows, not values


def unsketch_rows(table: torch.Tensor, codes: torch.Tensor) -> list[torch.Tensor]:
    """Per row r, s_r(j) * table[r, h_r(j)] (a list of rows tensors of length d)."""
    return [read_row(t, c) for t, c in zip(table, codes)]


def median_rows(values: list[torch.Tensor]) -> torch.Tensor:
    """Elementwise (lower) median of a few equal-length vectors; min/max networks for 1, 3 and 5 rows
    (torch.median over a short leading dimension is ~10x slower), torch.median otherwise."""
    mn, mx = torch.minimum, torch.maximum
    if len(values) == 1:
        return values[0]
    if len(values) == 3:
        a, b, c = values
        return mx(mn(a, b), mn(mx(a, b), c))
    if len(values) == 5:
        a, b, c, d, e = values
        lo1, hi1, lo2, hi2 = mn(a, b), mx(a, b), mn(c, d), mx(c, d)
        second = torch.maximum(lo1, lo2, out=lo1)   # drop the smallest of the four
        third = torch.minimum(hi1, hi2, out=hi1)    # and the largest: the 2nd and 3rd remain
        lo, hi = mn(second, third), mx(second, third)
        return torch.maximum(lo, torch.minimum(hi, e, out=hi), out=lo)  # median of (2nd, 3rd, e)
    return torch.stack(values).median(dim=0).values
