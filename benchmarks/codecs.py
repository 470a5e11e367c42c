"""Upload codecs: encode + decode time per codec, beside one dense copy of the same update.

Two updates: the float entries of fedsim's ResNet-18 (CIFAR-10 shape, ~11.2M values in its
own layer sizes) and a 100k-value one (ten layers of 10k). The update is a heavy-tailed
random vector (Gaussian times U^4). For each codec, on one torch thread, the best of
``--repeats`` runs (at least 30 for the 100k update, whose times are short and noisy) of:

  core   ``encode_vector`` + ``decode_vector`` on the flat float32 update (what the codec
         computes; the sketches draw their hashes as they go, every call: nothing of size d
         is kept between calls; DGC starts from an empty ``Context.state``)
  wire   ``encode`` (Upload -> the Flower ArrayRecords that travel) + ``decode`` (-> the model's
         ArrayRecord), the whole path of a reply, against the same for ``none``
  copy   ``update.clone()`` in the same process, the unit of the ratios printed

Targets at 11M values: dgc, topk, sign and terngrad core within 10x of the copy; sketch and
countsketch within 40x; the sketch near-linear in d (11M costs at most 150x what 100k costs).

Usage: python benchmarks/codecs.py [--repeats 10] [--only topk,sketch] [--small-only]
"""

from __future__ import annotations

import argparse
import time

import torch
from flwr.app import RecordDict

from strategies import Upload
from strategies.compression import CodecContext, get_codec
from strategies.records import to_record

RATIO = 0.01
SETTINGS = {"topk": {"ratio": RATIO}, "dgc": {"ratio": RATIO}, "sign": {}, "terngrad": {},
            "sketch": {"ratio": RATIO}, "countsketch": {"ratio": RATIO, "rows": 5, "topk": RATIO / 5},
            "ef21": {"inner": "topk", "ratio": RATIO}}
TARGETS = {"topk": 10, "dgc": 10, "sign": 10, "terngrad": 10, "sketch": 40, "countsketch": 40}


def resnet18_sizes() -> list[int]:
    from fedsim.world.models import build_model

    model = build_model("resnet18", 3, 32, 10, seed=0)
    return [v.numel() for v in model.state_dict().values() if v.is_floating_point()]


def update(sizes: list[int], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    d = sum(sizes)
    return torch.randn(d, generator=g) * torch.rand(d, generator=g).pow(4)


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def bench(name: str, sizes: list[int], x: torch.Tensor, repeats: int, copy_s: float) -> dict:
    codec = get_codec(name, SETTINGS.get(name, {}))
    ctx = CodecContext(seed=1, server_round=3, client=0)

    def core():
        payload = codec.encode_vector(x, sizes, RecordDict(), ctx)
        codec.decode_vector(payload, sizes, ctx)

    sent = {f"p{i}": torch.zeros(n) for i, n in enumerate(sizes)}
    weights = dict(zip(sent, torch.split(x, sizes)))
    sent_record = to_record(sent)

    def wire():
        content = codec.encode(Upload(weights, sent, {}), RecordDict(), ctx)
        codec.decode(content, sent_record, ctx)

    core_s = best(core, repeats) if name != "none" else float("nan")
    wire_s = best(wire, repeats)
    return {"codec": name, "d": x.numel(), "core_s": core_s, "wire_s": wire_s, "copy_s": copy_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--only", default="none,topk,dgc,sign,terngrad,ef21,sketch,countsketch")
    ap.add_argument("--small-only", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    names = args.only.split(",")
    updates = [[10_000] * 10] + ([] if args.small_only else [resnet18_sizes()])
    results = []
    for sizes in updates:
        x = update(sizes)
        copy_s = min(_timed(x.clone) for _ in range(5))
        repeats = args.repeats if x.numel() > 1e6 else max(args.repeats, 30)  # small: noisy, and cheap to repeat
        for name in names:
            results.append(bench(name, sizes, x, repeats, copy_s))
    print(f"{'codec':<12} {'d':>10} {'core s':>9} {'core/copy':>10} {'target':>7} {'wire s':>9} {'wire/copy':>10}")
    for r in results:
        target = TARGETS.get(r["codec"])
        print(f"{r['codec']:<12} {r['d']:>10,} {r['core_s']:>9.4f} {r['core_s'] / r['copy_s']:>10.1f} "
              f"{(str(target) + 'x') if target and r['d'] > 1e6 else '':>7} {r['wire_s']:>9.4f} "
              f"{r['wire_s'] / r['copy_s']:>10.1f}")
    print("dense copy: " + ", ".join(f"d={r['d']:,}: {r['copy_s'] * 1e3:.2f} ms" for r in results
                                      if r["codec"] == names[0]))
    by = {(r["codec"], r["d"]): r["core_s"] for r in results}
    ds = sorted({r["d"] for r in results})
    if len(ds) == 2:
        for name in ("sketch", "countsketch"):
            if (name, ds[0]) in by:
                print(f"{name}: {ds[1]:,} values cost {by[(name, ds[1])] / by[(name, ds[0])]:.0f}x what "
                      f"{ds[0]:,} cost (d ratio {ds[1] / ds[0]:.0f}x; target at most 150x)")


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


if __name__ == "__main__":
    main()
