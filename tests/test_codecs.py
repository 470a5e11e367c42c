"""Properties of the upload codecs (strategies/compression), each a check that a wrong codec fails:
TernGrad is unbiased, the sparse JL sketch keeps norms and inner products within its size's bound
and its de-sketch is its transpose, the count sketch finds planted heavy hitters, DGC conserves
mass, bit packing round-trips, top-k is exact, EF21's client and server estimates agree, and every
codec's reply is Flower Arrays only."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strategies import Upload
from strategies.compression import CodecContext, codec_names, get_codec
from strategies.compression.countsketch import CountSketchCodec, CountSketchParams
from strategies.compression.dgc import STATE as DGC_STATE
from strategies.compression.dgc import DgcCodec, DgcParams, density
from strategies.compression.hashing import (buckets_and_signs, median_chunked, median_rows, signed_hashes,
                                            sketch_chunked, sketch_rows, transpose_chunked, unsketch_rows)
from strategies.compression.packing import pack1, pack2, unpack1, unpack2
from strategies.compression.sketch import SketchCodec, SketchParams, SparseJL, local_epsilon
from strategies.compression.terngrad import TernGradCodec, TernGradParams, clip_layers
from strategies.compression.topk import select_topk
from strategies.records import to_record, to_torch

torch.set_num_threads(1)
FAST = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
seeds = st.integers(0, 2**31 - 1)


def _vector(seed: int, d: int, heavy_tail: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(d, generator=g)
    return x * torch.rand(d, generator=g).pow(4) * 10 if heavy_tail else x


# ----------------------------------------------------------------------------- packing


@FAST
@given(st.lists(st.integers(0, 3), max_size=300))
def test_two_bit_packing_round_trips(codes):
    t = torch.tensor(codes, dtype=torch.uint8)
    packed = pack2(t)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(len(codes) / 4)
    assert unpack2(packed, len(codes)).tolist() == codes


@FAST
@given(st.lists(st.booleans(), max_size=300))
def test_one_bit_packing_round_trips_in_numpy_order(bits):
    t = torch.tensor(bits, dtype=torch.bool)
    packed = pack1(t)
    assert packed.numpy().tobytes() == np.packbits(np.array(bits, dtype=bool)).tobytes()
    assert unpack1(packed, len(bits)).tolist() == bits


# ----------------------------------------------------------------------------- terngrad


@settings(max_examples=10, deadline=None)
@given(seeds, st.lists(st.integers(1, 40), min_size=1, max_size=3))
def test_terngrad_is_unbiased_for_the_clipped_update(seed, sizes):
    """The mean of N decodes (independent client seeds) approaches the layer-wise clipped update within
    6 standard errors per value (each decoded value has std <= scale / 2)."""
    x = _vector(seed, sum(sizes), heavy_tail=True)
    codec = TernGradCodec(TernGradParams(clip=2.5))
    n = 500
    total = torch.zeros_like(x)
    for i in range(n):
        ctx = CodecContext(seed=seed, server_round=1, client=i)
        total += codec.decode_vector(codec.encode_vector(x, sizes, RecordDict(), ctx), sizes, ctx)
    clipped = clip_layers(x, sizes, 2.5)
    scales = torch.cat([torch.full((s,), float(v.abs().max())) for s, v in zip(sizes, torch.split(clipped, sizes))])
    assert torch.all((total / n - clipped).abs() <= 6 * (scales / 2) / math.sqrt(n) + 1e-6)
    # and the clipping is TernGrad's (the bound is c * std of each layer, so large outliers are cut)
    for v, c in zip(torch.split(x, sizes), torch.split(clipped, sizes)):
        if v.numel() > 1:
            assert float(c.abs().max()) <= 2.5 * float(v.std(correction=0)) + 1e-6


def test_terngrad_values_are_ternary_and_two_bits_each():
    x = _vector(0, 1001)
    codec = TernGradCodec()
    payload = codec.encode_vector(x, [1001], RecordDict(), CodecContext())
    assert payload["codes"].numel() == 251 and payload["scales"].numel() == 1
    out = codec.decode_vector(payload, [1001], CodecContext())
    assert set((out / payload["scales"][0]).round().unique().tolist()) <= {-1.0, 0.0, 1.0}


# ----------------------------------------------------------------------------- sketch


@FAST
@given(seeds, st.integers(64, 3000), st.sampled_from([1, 2, 4]))
def test_sketch_desketch_is_the_transpose(seed, d, blocks):
    m = max(blocks, d // 8)
    s = SparseJL(seed, d, m, blocks)
    x, z = _vector(seed, d), _vector(seed + 1, s.m)
    assert float(s.apply(x) @ z) == pytest.approx(float(x @ s.transpose(z)), rel=1e-4, abs=1e-3)
    # the dense matrix built column by column from apply() is what transpose() applies
    if d <= 300:
        dense = torch.stack([s.apply(e) for e in torch.eye(d)], dim=1)
        assert torch.allclose(dense.T @ z, s.transpose(z), atol=1e-5)


@settings(max_examples=6, deadline=None)
@given(seeds, st.sampled_from([1, 2, 4]), st.booleans())
def test_sketch_preserves_norms_and_inner_products_within_the_jl_bound(seed, blocks, heavy):
    """Over 300 independent sketches of size m: E||Sx||^2 = ||x||^2 and E<Sx,Sy> = <x,y> (means within 5
    standard errors of the variance bounds Var||Sx||^2 <= 2||x||^4/m, Var<Sx,Sy> <= (||x||^2||y||^2 +
    <x,y>^2)/m); the norm's relative error exceeds Chebyshev's sqrt(2/(m delta)) in at most a few sketches
    for delta = 0.01."""
    d, m, trials = 2000, 256, 300
    x = _vector(seed, d, heavy_tail=heavy)
    y = 0.5 * x + _vector(seed + 1, d)
    norms, inners = [], []
    for t in range(trials):
        s = SparseJL(seed * 1000 + t, d, m, blocks)
        sx, sy = s.apply(x), s.apply(y)
        norms.append(float(sx @ sx))
        inners.append(float(sx @ sy))
    nx, ny, xy = float(x @ x), float(y @ y), float(x @ y)
    norms, inners = np.array(norms), np.array(inners)
    assert abs(norms.mean() - nx) <= 5 * math.sqrt(2 / m) * nx / math.sqrt(trials)
    assert abs(inners.mean() - xy) <= 5 * math.sqrt((nx * ny + xy * xy) / m) / math.sqrt(trials)
    assert norms.var() <= 2 * 2 * nx * nx / m
    eps = math.sqrt(2 / (m * 0.01))
    assert np.sum(np.abs(norms / nx - 1) > eps) <= 0.01 * trials + 3


def test_a_sketch_that_is_not_norm_preserving_fails_the_bound():
    """The bound bites: without the 1/sqrt(blocks) scale the mean norm is off by the factor blocks."""
    d, m = 2000, 256
    x = _vector(0, d)
    ratios = []
    for t in range(50):
        s = SparseJL(t, d, m, 4)
        s.scale = 1.0
        ratios.append(float(s.apply(x).norm() ** 2 / x.norm() ** 2))
    assert abs(np.mean(ratios) - 1) > 5 * math.sqrt(2 / m) / math.sqrt(50)


def test_sketch_is_shared_per_round_and_changes_between_rounds():
    codec = SketchCodec(SketchParams(ratio=0.1))
    x = _vector(0, 500)
    a = codec.encode_vector(x, [500], RecordDict(), CodecContext(seed=3, server_round=1, client=0))["sketch"]
    b = codec.encode_vector(x, [500], RecordDict(), CodecContext(seed=3, server_round=1, client=7))["sketch"]
    c = codec.encode_vector(x, [500], RecordDict(), CodecContext(seed=3, server_round=2, client=0))["sketch"]
    assert torch.equal(a, b) and not torch.equal(a, c) and a.numel() == 50


def test_sketch_and_noise_clips_adds_noise_and_reports_epsilon():
    p = SketchParams(ratio=0.1, noise=1.0, clip_norm=0.5, delta=1e-5)
    codec = SketchCodec(p)
    x = _vector(0, 2000) * 100
    y = codec.encode_vector(x, [2000], RecordDict(), CodecContext(seed=1, client=2))["sketch"]
    # clipped to 0.5 then N(0, 0.5^2) per entry: the norm is about 0.5 * sqrt(m), not 100s
    assert 0.3 * math.sqrt(200) < float(y.norm()) < 0.8 * math.sqrt(200)
    report = codec.report(3)
    assert report["codec_epsilon"] == pytest.approx(local_epsilon(1.0, 3, 1e-5))
    assert local_epsilon(1.0, 1, 1e-5) < report["codec_epsilon"] < local_epsilon(0.5, 3, 1e-5)
    with pytest.raises(ValueError, match="clip_norm"):
        SketchParams(noise=1.0)


# ----------------------------------------------------------------------------- count sketch


@FAST
@given(seeds, st.integers(1, 20))
def test_count_sketch_recovers_planted_heavy_hitters(seed, k):
    d, rows, cols = 20000, 5, 40 * k + 100
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.normal(0, 1e-3, d).astype(np.float32))
    planted = torch.from_numpy(rng.choice(d, size=k, replace=False))
    x[planted] = torch.from_numpy(rng.choice([-1.0, 1.0], k) * rng.uniform(1, 3, k)).float()
    codes = signed_hashes(seed, d, cols, rows)
    est = median_rows(unsketch_rows(sketch_rows(x, codes, cols), codes))
    # Each planted value is estimated to within the noise, and all of them are among the 2k largest
    # estimates (a false positive needs 3 of 5 rows to collide with heavy values of one sign: rare, not
    # impossible among 20,000 coordinates, hence 2k rather than k).
    assert torch.allclose(est[planted], x[planted], atol=0.05)
    assert set(planted.tolist()) <= set(select_topk(est, 2 * k).tolist())


@pytest.mark.parametrize("error_reset", ["zero", "subtract"])
def test_fetchsgd_error_feedback_keeps_what_was_not_sent(error_reset):
    """Round 1 sends the top-k of the unsketched mean; the rest stays in S_e and is sent later: after two
    rounds with zero updates in round 2, the server has sent the heavy values of round 1 (k per round).
    (The 10 heavy coordinates' buckets do not collide here, so zeroing the buckets round 1 sent loses
    nothing of the other 5.)"""
    d = 4000
    p = CountSketchParams(ratio=1.0, rows=5, topk=5 / d, error_reset=error_reset)  # roomy: no false positives
    codec = CountSketchCodec(p)
    sent = to_record({"w": torch.zeros(d)})
    x = torch.zeros(d)
    heavy = torch.arange(0, 1000, 100)  # 10 heavy values, 5 sent per round
    x[heavy] = torch.linspace(1, 2, 10)
    ctx = CodecContext(seed=5, server_round=1)

    def reply(v):
        up = Upload({"w": v}, {"w": torch.zeros(d)}, {})
        content = codec.encode(up, RecordDict(), ctx)
        content["metrics"] = MetricRecord({"num-examples": 1.0})
        return content

    r1 = codec.decode_round([reply(x), reply(x)], sent, ctx)
    a = to_torch(r1[0]["arrays"])["w"]
    assert torch.equal(a, to_torch(r1[1]["arrays"])["w"])  # every reply decodes to the same model
    assert set(torch.nonzero(a).view(-1).tolist()) == set(heavy[5:].tolist())
    r2 = codec.decode_round([reply(torch.zeros(d))], sent, CodecContext(seed=5, server_round=2))
    b = to_torch(r2[0]["arrays"])["w"]
    assert set(torch.nonzero(b).view(-1).tolist()) == set(heavy[:5].tolist())
    assert torch.allclose(a + b, x, atol=1e-4)


@pytest.mark.parametrize("error_reset", ["zero", "subtract"])
def test_fetchsgd_server_round_follows_the_reference_rule(error_reset):
    """Three server rounds against FetchSGD's server step written from the reference code
    (CommEfficient fed_aggregator.py ``_server_helper_sketched``, virtual momentum and error, lr 1):
    V_u = rho V_u + S; V_e += V_u; Delta = top-k(U(V_e)); T = S(Delta); ``zero``: V_e[T != 0] = 0 (the
    reference's rule), ``subtract``: V_e -= T (the paper's); V_u[T != 0] = 0. Small sketch, so
    buckets collide and the two rules differ."""
    d, rho = 3000, 0.9
    p = CountSketchParams(ratio=0.1, rows=3, topk=0.01, momentum=rho, error_reset=error_reset)
    codec = CountSketchCodec(p)
    sent = to_record({"w": torch.zeros(d)})
    rng = np.random.default_rng(3)
    v_u = v_e = None
    for rnd in range(1, 4):
        ctx = CodecContext(seed=11, server_round=rnd)
        xs = [torch.from_numpy(rng.normal(0, 1, d).astype(np.float32)) for _ in range(2)]
        contents = []
        for x, n in zip(xs, (3.0, 1.0)):
            content = codec.encode(Upload({"w": x}, {"w": torch.zeros(d)}, {}), RecordDict(), ctx)
            content["metrics"] = MetricRecord({"num-examples": n})
            contents.append(content)
        got = to_torch(codec.decode_round(contents, sent, ctx)[0]["arrays"])["w"]
        mean = 0.75 * codec.sketch(xs[0], ctx) + 0.25 * codec.sketch(xs[1], ctx)
        v_u = mean.clone() if v_u is None else rho * v_u + mean
        v_e = v_u.clone() if v_e is None else v_e + v_u
        est = codec.unsketch(v_e, d, ctx)
        idx = torch.topk(est.abs(), int(0.01 * d)).indices
        delta = torch.zeros(d)
        delta[idx] = est[idx]
        table = codec.sketch(delta, ctx)
        if error_reset == "zero":
            v_e[table != 0] = 0
        else:
            v_e = v_e - table
        v_u[table != 0] = 0
        assert torch.allclose(got, delta, atol=1e-6)
        assert torch.allclose(codec.error_table, v_e, atol=1e-5)
        assert torch.allclose(codec.momentum_table, v_u, atol=1e-5)
    assert int((delta != 0).sum()) == int(0.01 * d)


# ----------------------------------------------------------------------------- dgc and topk


@FAST
@given(seeds, st.floats(0.0, 0.95), st.sampled_from([None, 5.0]), st.lists(st.integers(1, 3000), min_size=1,
                                                                            max_size=4))
def test_dgc_conserves_mass(seed, momentum, clip, sizes):
    """Each round: what was sent plus the new residual equals what was accumulated (v + u), exactly."""
    p = DgcParams(ratio=0.05, momentum=momentum, clip_norm=clip, warmup_rounds=2)
    codec = DgcCodec(p)
    state = RecordDict()
    d = sum(sizes)
    for rnd in range(1, 5):
        g = _vector(seed + rnd, d)
        stored = to_torch(state[DGC_STATE]) if DGC_STATE in state else {}
        before = {"u": torch.zeros(d), "v": torch.zeros(d), **stored}
        if clip is not None and float(g.norm()) > clip:
            g = g * (clip / float(g.norm()))
        u = torch.add(g, before["u"], alpha=momentum)  # u <- m u + g (rounded as the codec rounds it)
        assert torch.allclose(u, before["u"] * momentum + g, atol=1e-6)
        accumulated = before["v"] + u
        payload = codec.encode_vector(_vector(seed + rnd, d), sizes, state, CodecContext(seed, rnd, 0))
        sent = codec.decode_vector(payload, sizes, CodecContext(seed, rnd, 0))
        residual = to_torch(state[DGC_STATE])["v"]
        assert torch.equal(sent + residual, accumulated)
        idx = payload["indices"].long()
        assert payload["indices"].dtype == torch.int32 and torch.all(residual[idx] == 0)
        if momentum > 0:
            assert torch.all(to_torch(state[DGC_STATE])["u"][idx] == 0)  # momentum factor masking
        else:
            assert "u" not in state[DGC_STATE]  # no momentum to keep
        target = sum(max(1, math.ceil(s * density(0.05, 2, rnd))) for s in sizes)
        assert idx.numel() <= target


def test_dgc_warmup_density_decays_exponentially_to_the_ratio():
    assert [round(density(0.001, 4, r), 6) for r in range(1, 7)] == [0.251189, 0.063096, 0.015849, 0.003981,
                                                                     0.001, 0.001]


def test_topk_fast_path_is_exact():
    x = _vector(1, 400_000, heavy_tail=True)
    k = 4000
    assert torch.equal(select_topk(x, k, seed=3), torch.sort(torch.topk(x.abs(), k).indices).values)


# ----------------------------------------------------------------------------- the wire and ef21


def _upload(seed: int = 0) -> Upload:
    g = torch.Generator().manual_seed(seed)
    sent = {"w": torch.randn(40, 30, generator=g), "b": torch.randn(30, generator=g),
            "n": torch.tensor(3, dtype=torch.int64)}
    weights = {k: (v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v + 1)
               for k, v in sent.items()}
    return Upload(weights, sent, {}, {"extra": to_record({"c": torch.ones(3)})})


@pytest.mark.parametrize("name", codec_names())
def test_every_codec_sends_flower_arrays_and_decodes_to_the_model_shape(name):
    up = _upload()
    content = get_codec(name).encode(up, RecordDict(), CodecContext())
    assert all(isinstance(r, ArrayRecord) for r in content.values())
    assert all(a.stype == "numpy.ndarray" for r in content.values() for a in r.values())
    decoded = get_codec(name).decode_round([content], to_record(up.sent), CodecContext())[0]
    out = to_torch(decoded["arrays"])
    assert list(out) == ["w", "b", "n"] and int(out["n"]) == 4
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in up.weights.items()}
    assert torch.equal(to_torch(decoded["extra"])["c"], torch.ones(3))  # extras travel dense
    if name not in ("countsketch", "sketch"):  # (a top-k of one table; S^T S x: error ~ sqrt(d/m) ||x||)
        err = (out["w"] - up.weights["w"]).norm() / (up.sent["w"] - up.weights["w"]).norm()
        assert err < 1.5


def test_topk_and_dgc_report_the_coordinates_sent():
    up = _upload()
    for name in ("topk", "dgc"):
        codec = get_codec(name, {"ratio": 0.1})
        content = codec.encode(up, RecordDict(), CodecContext())
        masks = codec.support(content, to_record(up.sent))
        assert set(masks) == {"w", "b"} and sum(int(m.sum()) for m in masks.values()) == 123
        decoded = to_torch(codec.decode(content, to_record(up.sent))["arrays"])
        assert torch.all((decoded["w"] != up.sent["w"]) == torch.from_numpy(masks["w"]))
    assert get_codec("sign").support(get_codec("sign").encode(up, RecordDict()), to_record(up.sent)) is None


@pytest.mark.parametrize("inner", ["topk", "sign", "terngrad"])
def test_ef21_client_and_server_estimates_agree(inner):
    client_codec = get_codec("ef21", {"inner": inner, "ratio": 0.05})
    server_codec = get_codec("ef21", {"inner": inner, "ratio": 0.05})
    states = {0: RecordDict(), 1: RecordDict()}
    for rnd in range(1, 4):
        for client in ((0, 1) if rnd != 2 else (1,)):  # client 0 skips round 2
            up = _upload(seed=10 * rnd + client)
            ctx = CodecContext(seed=1, server_round=rnd, client=client)
            content = client_codec.encode(up, states[client], ctx)
            content["fedsim"] = ConfigRecord({"partition-id": client})
            decoded = server_codec.decode_round([content], to_record(up.sent),
                                                CodecContext(seed=1, server_round=rnd))[0]
            g = to_torch(states[client]["codec-ef21"])["g"]
            out = to_torch(decoded["arrays"])
            assert torch.equal(out["w"], (up.sent["w"].reshape(-1) + g[:1200]).view(40, 30))
            assert torch.equal(server_codec.estimates[client], g)


# ----------------------------------------------------------------------------- hashing


@FAST
@given(seeds, st.sampled_from([1, 2, 3, 4, 5, 7]), st.integers(1, 200))
def test_median_network_is_the_lower_median(seed, rows, d):
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(-3, 4, (rows, d), generator=g).float()  # many ties
    assert torch.equal(median_rows([v.clone() for v in values]), values.median(dim=0).values)


@FAST
@given(seeds, st.integers(1, 500), st.integers(1, 50))
def test_signed_codes_sketch_is_the_count_sketch(seed, d, cols):
    codes = signed_hashes(seed, d, cols, 2)
    x = _vector(seed, d)
    buckets, signs = buckets_and_signs(codes)
    for r in range(2):
        explicit = torch.zeros(cols).index_add_(0, buckets[r], signs[r] * x)
        assert torch.allclose(sketch_rows(x, codes, cols)[r], explicit, atol=1e-5)
        table = torch.randn(cols, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(unsketch_rows(table[None], codes[r:r + 1])[0], signs[r] * table[buckets[r]])


@FAST
@given(seeds, st.integers(1, 200_000), st.integers(1, 300), st.integers(1, 3))
def test_chunked_sketch_draws_the_stored_codes(seed, d, cols, rows):
    x = _vector(seed, d)
    codes = signed_hashes(seed, d, cols, rows)
    table = sketch_chunked(x, seed, cols, rows)
    assert torch.allclose(table, sketch_rows(x, codes, cols), atol=1e-3)
    summed = unsketch_rows(table, codes)
    assert torch.allclose(transpose_chunked(table, seed, d), sum(summed[1:], summed[0]), atol=1e-4)
    assert torch.equal(median_chunked(table, seed, d), median_rows(summed))
