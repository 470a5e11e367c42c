"""Forward 2-D dual-tree complex wavelet transform (Kingsbury), for CW-SSIM.

breaching (``breaching/analysis/metrics.py``, ``cw_ssim``) scores reconstructions with the
bandpass coefficients of ``pytorch_wavelets.DTCWTForward(J=5, biort="near_sym_b",
qshift="qshift_b")`` (symmetric extension, the default mode). That package does not import
with setuptools >= 81 (it loads its filter tables through ``pkg_resources``), so fedsim computes
the same transform here, in float64 NumPy, from the published filters:

- level 1: the near-symmetric 13/19-tap biorthogonal pair (h0o, h1o), undecimated along each
  axis, centred, with half-sample symmetric extension at the borders;
- levels 2+: the 14-tap Q-shift pair (tree a: h0a, tree b its reverse; highpass h1 from h0 by
  alternating signs), decimated by 2 along each axis, the two trees' outputs interleaved
  (a first for a lowpass, b first for a highpass); a lowpass whose side is not a multiple of 4
  is first extended by one edge row (column) on each side; an odd input side gets its last
  row (column) repeated;
- each level's LH, HH, HL subbands are turned into complex pairs from 2x2 quads
  (``q2c``: a, b / c, d -> (a - d) + i(b + c) and (a + d) + i(b - c), divided by sqrt 2),
  giving six orientations (15, 45, 75, 105, 135, 165 degrees).

``tests/test_attacks_metrics.py`` checks every coefficient against ``pytorch_wavelets`` where it
can be imported. Only the forward bandpass output is implemented (all CW-SSIM needs).
"""

from __future__ import annotations

import numpy as np

# Near-symmetric 13/19-tap level-1 analysis filters ("near_sym_b") and the 14-tap
# quarter-shift lowpass of tree a ("qshift_b"), as tabulated by Kingsbury.
H0O = np.array([-0.0017578125, 0.0, 0.022265625, -0.046875, -0.0482421875, 0.296875, 0.55546875,
                0.296875, -0.0482421875, -0.046875, 0.022265625, 0.0, -0.0017578125])
H1O = np.array([-7.062639508928571e-05, 0.0, 0.0013419015066964285, -0.0018833705357142855,
                -0.007156808035714285, 0.023856026785714284, 0.05564313616071428, -0.05168805803571428,
                -0.29975760323660716, 0.5594308035714286, -0.29975760323660716, -0.05168805803571428,
                0.05564313616071428, 0.023856026785714284, -0.007156808035714285, -0.0018833705357142855,
                0.0013419015066964285, 0.0, -7.062639508928571e-05])
H0A = np.array([0.003253142763653182, -0.00388321199915849, 0.03466034684485349, -0.03887280126882779,
                -0.11720388769911527, 0.27529538466888204, 0.7561456438925225, 0.5688104207121227,
                0.011866092033797, -0.1067118046866654, 0.023825384794920298, 0.01702522388155399,
                -0.005439475937274115, -0.004556895628475491])
H0B = H0A[::-1].copy()
H1A = H0B * (-1.0) ** np.arange(len(H0B))
H1B = H1A[::-1].copy()


def _extend(n: int, pad: int) -> np.ndarray:
    """Indices of positions -pad .. n+pad-1 under half-sample symmetric reflection."""
    i = np.mod(np.arange(-pad, n + pad), 2 * n)
    return np.where(i < n, i, 2 * n - 1 - i)


def _filter(x: np.ndarray, h: np.ndarray, axis: int) -> np.ndarray:
    """Centred convolution with an odd-length filter along ``axis`` (same size)."""
    n, half = x.shape[axis], len(h) // 2
    ext = _extend(n, half)
    # out[i] = sum_k h[k] x[i + half - k]; position p sits at ext[p + half].
    idx = ext[np.arange(n)[:, None] + 2 * half - np.arange(len(h))[None, :]]
    xm = np.moveaxis(x, axis, -1)
    return np.moveaxis(xm[..., idx] @ h, -1, axis)


def _decimate(x: np.ndarray, ha: np.ndarray, hb: np.ndarray, highpass: bool, axis: int) -> np.ndarray:
    """Two-tree filtering and decimation by 2 along ``axis`` (its length a multiple of 4)."""
    n, m = x.shape[axis], len(ha)
    if n % 4:
        raise ValueError(f"length {n} along axis {axis} is not a multiple of 4")
    ext = _extend(n, m)
    rows = np.arange(n // 4)[:, None]
    taps = 2 * (m - 1 - np.arange(m))[None, :]
    xm = np.moveaxis(x, axis, -1)
    tree_a = xm[..., ext[2 + 4 * rows + taps]] @ ha
    tree_b = xm[..., ext[3 + 4 * rows + taps]] @ hb
    first, second = (tree_b, tree_a) if highpass else (tree_a, tree_b)
    out = np.stack([first, second], axis=-1).reshape(*xm.shape[:-1], n // 2)
    return np.moveaxis(out, -1, axis)


def _orientations(lh: np.ndarray, hl: np.ndarray, hh: np.ndarray) -> np.ndarray:
    """Six complex subbands (..., 6, H/2, W/2) in the order 15, 45, 75, 105, 135, 165 degrees."""
    def q2c(y):
        y = y / np.sqrt(2)
        a, b, c, d = y[..., 0::2, 0::2], y[..., 0::2, 1::2], y[..., 1::2, 0::2], y[..., 1::2, 1::2]
        return (a - d) + 1j * (b + c), (a + d) + 1j * (b - c)

    d15, d165 = q2c(lh)
    d45, d135 = q2c(hh)
    d75, d105 = q2c(hl)
    return np.stack([d15, d45, d75, d105, d135, d165], axis=-3)


def _pad_edges(x: np.ndarray, axis: int) -> np.ndarray:
    first = np.take(x, [0], axis=axis)
    last = np.take(x, [-1], axis=axis)
    return np.concatenate([first, x, last], axis=axis)


def dtcwt_highpasses(x: np.ndarray, levels: int) -> list[np.ndarray]:
    """Complex bandpass coefficients of ``x`` (..., H, W): one (..., 6, h_j, w_j) array per level."""
    x = np.asarray(x, dtype=np.float64)
    if x.shape[-2] % 2:
        x = np.concatenate([x, x[..., -1:, :]], axis=-2)
    if x.shape[-1] % 2:
        x = np.concatenate([x, x[..., -1:]], axis=-1)
    lo, hi = _filter(x, H0O, -1), _filter(x, H1O, -1)
    low = _filter(lo, H0O, -2)
    out = [_orientations(_filter(lo, H1O, -2), _filter(hi, H0O, -2), _filter(hi, H1O, -2))]
    for _ in range(1, levels):
        if low.shape[-2] % 4:
            low = _pad_edges(low, -2)
        if low.shape[-1] % 4:
            low = _pad_edges(low, -1)
        lo = _decimate(low, H0B, H0A, False, -1)
        hi = _decimate(low, H1B, H1A, True, -1)
        low = _decimate(lo, H0B, H0A, False, -2)
        out.append(_orientations(_decimate(lo, H1B, H1A, True, -2), _decimate(hi, H0B, H0A, False, -2),
                                 _decimate(hi, H1B, H1A, True, -2)))
    return out
