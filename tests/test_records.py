"""strategies.records: Flower's Array format exactly, with cached headers."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from strategies import records

CASES = [
    np.arange(12, dtype=np.float32).reshape(3, 4),
    np.array(7, dtype=np.int64),  # 0-d, like BatchNorm's num_batches_tracked
    np.zeros((0, 5), dtype=np.float64),
    np.arange(6, dtype=np.float16).reshape(2, 3),
    np.array([True, False]),
    np.arange(24, dtype=np.int32).reshape(2, 3, 4)[:, 1:, ::2],  # not contiguous
    np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
]


@pytest.mark.parametrize("arr", CASES, ids=lambda a: f"{a.dtype}{a.shape}")
def test_encoding_is_flowers_and_decodes_both_ways(arr):
    for _ in range(2):  # the second time from the header cache
        ours = records.encode(arr)
        assert (ours.dtype, ours.shape, ours.stype) == (str(arr.dtype), arr.shape, "numpy.ndarray")
        if arr.flags.c_contiguous:
            assert ours.data == Array(arr).data  # byte for byte what Flower writes
        np.testing.assert_array_equal(ours.numpy(), arr)  # Flower reads ours
        flower = Array(arr)
        for decoded in (records.decode(flower), records.decode(flower, writable=True), records.decode(ours)):
            assert decoded.dtype == arr.dtype and decoded.shape == arr.shape
            np.testing.assert_array_equal(decoded, arr)


def test_views_are_read_only_and_copies_are_not():
    a = records.encode(np.ones(3, np.float32))
    assert not records.decode(a).flags.writeable
    assert records.decode(a, writable=True).flags.writeable
    assert all(v.flags.writeable for v in records.to_numpy(ArrayRecord({"a": a})).values())


def test_state_dict_round_trip_loads_into_a_model():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    rec = records.to_record(model.state_dict())
    assert list(rec.keys()) == list(model.state_dict().keys())
    state = records.to_torch(rec)
    for k, v in model.state_dict().items():
        assert torch.equal(state[k], v) and state[k].dtype == v.dtype
    torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).load_state_dict(state)
    state["0.weight"].add_(1)  # own memory: writing does not touch the record
    np.testing.assert_array_equal(rec["0.weight"].numpy(), model.state_dict()["0.weight"].numpy())


def test_bad_data_is_refused():
    with pytest.raises(TypeError, match="object"):
        records.encode(np.array([{"a": 1}], dtype=object))
    bogus = Array(dtype="float32", shape=(1,), stype="numpy.ndarray", data=b"not an npy file at all")
    with pytest.raises(ValueError):
        records.decode(bogus)
    with pytest.raises(TypeError):
        records.decode(Array(dtype="float32", shape=(1,), stype="torch.Tensor", data=b"\x00" * 4))


def test_cached_header_arrays_read_as_flowers_arrays():
    rng = np.random.default_rng(1)
    record = ArrayRecord({"w": Array(rng.normal(size=(3, 5)).astype(np.float32)), "i": Array(np.arange(4))})
    fast = records.fast_reading(record)
    assert list(fast.keys()) == list(record.keys())
    for key in record:
        ours, theirs = fast[key].numpy(), record[key].numpy()
        assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs)
        ours += 1  # own, writable memory (Flower's DP clipping edits it in place)
        assert np.array_equal(record[key].numpy(), theirs)
    assert fast.count_bytes() == record.count_bytes()
