"""Bit packing with tensor ops: 2-bit codes (TernGrad) four to a byte, 1-bit signs eight to a byte."""

from __future__ import annotations

import torch

_SHIFT2 = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)
_SHIFT1 = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)


def pack2(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in 0..3 (length n) -> ceil(n/4) bytes; code i sits in bits 2*(i%4) of byte i//4."""
    n = codes.numel()
    padded = torch.zeros((n + 3) // 4 * 4, dtype=torch.uint8, device=codes.device)
    padded[:n] = codes
    q = padded.view(-1, 4)
    return q[:, 0] | (q[:, 1] << 2) | (q[:, 2] << 4) | (q[:, 3] << 6)


def unpack2(packed: torch.Tensor, n: int) -> torch.Tensor:
    return ((packed.view(-1, 1) >> _SHIFT2.to(packed.device)) & 3).reshape(-1)[:n]


def pack1(bits: torch.Tensor) -> torch.Tensor:
    """bool (length n) -> ceil(n/8) bytes, most significant bit first (numpy.packbits' order)."""
    n = bits.numel()
    padded = torch.zeros((n + 7) // 8 * 8, dtype=torch.uint8, device=bits.device)
    padded[:n] = bits
    q = padded.view(-1, 8) << _SHIFT1.to(bits.device)
    return _or_rows(q)


def _or_rows(q: torch.Tensor) -> torch.Tensor:
    out = q[:, 0] | q[:, 1]
    for j in range(2, 8):  # eight columns, not a loop over values
        out |= q[:, j]
    return out


def unpack1(packed: torch.Tensor, n: int) -> torch.Tensor:
    return ((packed.view(-1, 1) >> _SHIFT1.to(packed.device)) & 1).reshape(-1)[:n].bool()
