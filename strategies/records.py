"""Named tensors <-> Flower ``ArrayRecord``s, byte-for-byte in Flower's format, without its per-array cost.

Flower stores each ``Array`` as a ``.npy`` file in memory (``np.save`` / ``np.load``). For
the small models federated simulations use, the cost of that is not the copy but the
header: ``np.load`` parses the header's Python-literal dict with ``ast.literal_eval``
(about 70 us an array), and ``np.save`` formats it anew each time. A round of W1
(benchmarks/engine_overhead.py) converts about 90 arrays, which made this half of
fedsim's per-round overhead.

The same shapes travel every round, so this module caches headers: an encoded header is
taken once from ``np.save``'s own output for a (dtype, shape) and reused; a header seen on
decoding is parsed once by ``numpy.lib.format`` and then looked up by its bytes. The
payload is NumPy's bytes either way, so every ``Array`` built here equals what
``Array.from_numpy_ndarray`` builds, and ``Array.numpy()`` reads it (tests/test_records.py).
Object dtypes are refused, as ``np.load(allow_pickle=False)`` refuses them.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

_MAGIC = b"\x93NUMPY"
_encode_headers: dict[tuple[str, tuple[int, ...]], bytes] = {}
_decode_headers: dict[bytes, tuple[np.dtype, tuple[int, ...], bool]] = {}


def _numpy(value: Any) -> np.ndarray:
    arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    return arr if arr.flags.c_contiguous else np.ascontiguousarray(arr)  # (ascontiguousarray makes 0-d 1-d)


def encode(value: Any) -> Array:
    """A Flower ``Array`` (``numpy.ndarray`` serialisation) of a tensor or array."""
    arr = _numpy(value)
    if arr.dtype.hasobject:
        raise TypeError(f"cannot send an array of dtype {arr.dtype} (object arrays need pickling)")
    key = (arr.dtype.str, arr.shape)
    header = _encode_headers.get(key)
    if header is None:
        buf = io.BytesIO()
        np.save(buf, arr, allow_pickle=False)
        data = buf.getvalue()
        _encode_headers[key] = data[: len(data) - arr.nbytes]
        return Array(dtype=str(arr.dtype), shape=tuple(arr.shape), stype="numpy.ndarray", data=data)
    # One copy of the payload (``header + arr.tobytes()`` would copy it twice): the same bytes.
    return Array(dtype=str(arr.dtype), shape=tuple(arr.shape), stype="numpy.ndarray",
                 data=b"".join((header, arr.reshape(-1).view(np.uint8).data)))


# numpy's public header readers; version 3 (UTF-8 field names) is left to Array.numpy().
_READERS = {1: np.lib.format.read_array_header_1_0, 2: np.lib.format.read_array_header_2_0}


def _header(data: bytes) -> tuple[bytes, tuple[np.dtype, tuple[int, ...], bool]]:
    if data[:6] != _MAGIC:
        raise ValueError("array data is not in NumPy's .npy format")
    major = data[6]
    end = 10 + int.from_bytes(data[8:10], "little") if major == 1 else 12 + int.from_bytes(data[8:12], "little")
    raw = data[:end]
    parsed = _decode_headers.get(raw)
    if parsed is None:
        fp = io.BytesIO(raw)
        fp.seek(8)
        shape, fortran, dtype = _READERS[major](fp)
        if dtype.hasobject:
            raise ValueError("refusing an object array (it would need unpickling)")
        parsed = _decode_headers[raw] = (dtype, tuple(shape), bool(fortran))
    return raw, parsed


def decode(array: Array, *, writable: bool = False) -> np.ndarray:
    """The NumPy array an ``Array`` holds (what ``Array.numpy()`` returns).

    Read-only view of the message's bytes unless ``writable``, which copies.
    """
    if array.stype != "numpy.ndarray" or array.data[6:7] not in (b"\x01", b"\x02"):
        return array.numpy()  # Flower's own reader (and its error for what it cannot read)
    raw, (dtype, shape, fortran) = _header(array.data)
    count = int(np.prod(shape, dtype=np.int64))
    out = np.frombuffer(array.data, dtype=dtype, count=count, offset=len(raw))
    out = out.reshape(shape, order="F" if fortran else "C")
    return out.copy() if writable else out


def to_record(tensors: Mapping[str, Any]) -> ArrayRecord:
    """An ArrayRecord from named torch tensors or NumPy arrays (order kept)."""
    return _record((k, encode(v)) for k, v in tensors.items())


def _record(items) -> ArrayRecord:
    # Item by item: ArrayRecord(dict_of_arrays) would build every Array a second time.
    record = ArrayRecord()
    for key, array in items:
        record[key] = array
    return record


def to_numpy(record: ArrayRecord) -> dict[str, np.ndarray]:
    """NumPy arrays (own memory, as ``Array.numpy()`` gives) of a record's arrays, by name."""
    return {k: decode(v, writable=True) for k, v in record.items()}


def to_torch(record: ArrayRecord, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Torch tensors (own memory) of a record's arrays, by name: a loadable state dict; on ``device``
    when given (a record is always read on the CPU)."""
    out = {k: torch.from_numpy(decode(v, writable=True)) for k, v in record.items()}
    return out if device is None else {k: v.to(device) for k, v in out.items()}


class CachedHeaderArray(Array):
    """An ``Array`` whose ``numpy()`` decodes through the header cache (same result, own memory).

    For the server's own reading of replies, so that Flower's ``aggregate_arrayrecords`` and DP
    wrappers (which call ``Array.numpy()`` per array) skip the header parsing. Never sent:
    Flower's wire format names an object's class, and only ``Array`` is known on the far side.
    """

    def numpy(self) -> np.ndarray:
        return decode(self, writable=True)


def fast_reading(record: ArrayRecord) -> ArrayRecord:
    """The same arrays (same bytes, shared) as ``CachedHeaderArray``s."""
    return _record((k, CachedHeaderArray(dtype=a.dtype, shape=a.shape, stype=a.stype, data=a.data))
                   for k, a in record.items())
