"""Issue 9, "results to reproduce" items 3 and 4: label recovery on trained models, and
dropout inside the hidden layers.

    python experiments/audit/labels_dropout.py labels|dropout|all [--seeds N] [--out DIR]
        [--train-seeds N] [--iterations N] [--batches 1,2,4] [--places hidden,classifier]
        [--rates 0.25,0.5] [--attacks ig,dia,ig_true_masks]

``labels``: the sigmoid LeNet (DLG's uniform init) and the ReLU MLP (256 hidden) are
trained centrally with plain minibatch SGD on digits 8x8 (batch 32, no momentum; not
through fedsim's FedAvg), and the first step whose test accuracy reaches each target
(0 = untrained, 0.2, 0.6, 0.9) is kept. At each checkpoint a client's batch of 8
training images (the batch ``attacks.case.build_case`` draws for the seed) is observed
as one gradient and as a 4-step local-SGD update (2 epochs of 4, lr 0.1), and
every label rule of ``attacks.label_recovery`` recovers the label multiset: the default
bias-gradient count estimate and LLG / LLG+ (auxiliary data: the digits test split, from
which no victim is drawn and which also measures the checkpoints' accuracy) / LLG* (zero,
one and uniform dummies). ``random`` is 8 uniform
labels. Cells average over ``--train-seeds`` trained models x ``--seeds`` batches.

``dropout``: the sigmoid LeNet on digits 16x16 with dropout inside the network
(``dropout_at: hidden``, after conv1 and conv2) and, for reference, before the classifier
(the published placement), p 0.25 and 0.5, gradient threat, labels known: plain IG
(dropout off), Dropout Inversion (``dia``) and IG given the client's true masks (the upper
bound); PSNR / SSIM means over ``--seeds`` seeds. The batch comes from ``build_case``;
the model is rebuilt with the placement (same weights: dropout holds no parameters) and
the client's masks are drawn per dropout layer from Bernoulli(1 - p), seeded.

Each experiment writes DIR/<name>.json (raw rows) and DIR/<name>.md (tables), each
through a temporary file and a rename. Single-threaded; settings in the constants below.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from attacks import Observation, build_attack  # noqa: E402
from attacks.case import build_case  # noqa: E402
from attacks.label_recovery import _last_layer_gradient, batch_labels  # noqa: E402
from attacks.metrics import evaluate, label_accuracy  # noqa: E402
from attacks.objective import batch_gradients, dropout_shapes, leaf_parameters, local_sgd_update  # noqa: E402
from fedsim.world.data import load_dataset  # noqa: E402
from fedsim.world.models import build_model  # noqa: E402

# ---------------------------------------------------------------- label recovery settings
# Plain SGD, batch 32: lr 0.05 takes the MLP from 9% to 94% test accuracy in 600 steps; the
# sigmoid LeNet barely moves at 0.05 (26% after 600 steps) and reaches 90% in ~290 at 0.5.
# Its accuracy jumps in single steps (0.45 -> 0.69), so a checkpoint lands near, not on, a target.
TRAIN = {"mlp": {"init": "default", "lr": 0.05}, "lenet": {"init": "uniform", "lr": 0.5}}
TRAIN_BATCH, MAX_STEPS = 32, 4000
TARGETS = (0.0, 0.2, 0.6, 0.9)
VICTIM_BATCH = 8
UPDATE_STEPS, UPDATE_LOCAL_BATCH = 4, 4  # 2 epochs over the 8 samples, each sample seen twice
UPDATE_LR = 0.1  # build_case's default; one rate for both models so that the rows compare
METHODS = {  # column -> batch_labels options (llg+ gets the auxiliary data at run time)
    "bias": {"method": "bias"},
    "llg": {"method": "llg"},
    "llg+": {"method": "llg+"},
    "llg*-zero": {"method": "llg*", "dummy": "zero"},
    "llg*-one": {"method": "llg*", "dummy": "one"},
    "llg*-uniform": {"method": "llg*", "dummy": "uniform"},
}

# ---------------------------------------------------------------- dropout settings
DROPOUT_SIZE = 16
PLACES = ("hidden", "classifier")
RATES = (0.25, 0.5)


def mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else float("nan")


def md_table(caption: str, columns: list[str], rows: list[str]) -> str:
    return (f"{caption}\n\n| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|\n"
            + "\n".join(rows))


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ================================================================ labels
def test_accuracy(model, data) -> float:
    with torch.no_grad():
        return float((model(data.x_test).argmax(1) == data.y_test).float().mean())


def train_checkpoints(arch: str, seed: int, data) -> dict[float, dict]:
    """Plain SGD from the seeded init; the state at the first step reaching each target."""
    cfg = TRAIN[arch]
    model = build_model(arch, data.channels, data.image_size, data.num_classes, init=cfg["init"], seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"])
    gen = torch.Generator().manual_seed(1_000 + seed)
    pending, out, step = sorted(TARGETS), {}, 0
    acc = test_accuracy(model, data)
    while pending:
        while pending and acc >= pending[0]:
            out[pending.pop(0)] = {"state": copy.deepcopy(model.state_dict()), "test_acc": acc, "step": step}
        if not pending:
            break
        if step >= MAX_STEPS:
            raise RuntimeError(f"{arch} seed {seed}: test accuracy {acc:.2f} after {step} steps, "
                               f"target {pending[0]} not reached")
        idx = torch.randint(len(data.y_train), (TRAIN_BATCH,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        acc = test_accuracy(model, data)
    return out


def observe(arch: str, state, x, y, threat: str, data) -> Observation:
    net = build_model(arch, data.channels, data.image_size, data.num_classes, init=TRAIN[arch]["init"])
    net.load_state_dict(state)
    net.eval()
    params = leaf_parameters(net)
    common = dict(input_shape=(data.channels, data.image_size, data.image_size), num_classes=data.num_classes)
    if threat == "gradient":
        grads = batch_gradients(net, params, x, y, create_graph=False)
        return Observation.from_gradients(net, grads, batch_size=len(y), **common)
    lr = UPDATE_LR
    delta = local_sgd_update(net, params, x, y, lr=lr, steps=UPDATE_STEPS, batch_size=UPDATE_LOCAL_BATCH,
                             create_graph=False)
    return Observation.from_update(net, delta, lr=lr, local_steps=UPDATE_STEPS, num_samples=len(y),
                                   local_batch_size=UPDATE_LOCAL_BATCH, **common)


def sign_detection(obs: Observation, x: torch.Tensor, y: torch.Tensor) -> dict:
    """(P1) recall and precision of "weight-row sum < 0 means the class is present", and
    for each present class whether it was detected and its least confident sample's
    softmax on the true class (at the weights sent: why a class goes undetected)."""
    g_w, _ = _last_layer_gradient(obs)
    neg = set(torch.nonzero(g_w.sum(1) < 0).flatten().tolist())
    present = set(y.tolist())
    with torch.no_grad():
        p_true = torch.softmax(obs.model(x), dim=-1)[torch.arange(len(y)), y]
    classes = {int(k): {"detected": k in neg, "min_p_true": round(float(p_true[y == k].min()), 4)} for k in present}
    return {"p1_recall": len(neg & present) / len(present),
            "p1_precision": len(neg & present) / len(neg) if neg else 1.0, "classes": classes}


def exp_labels(seeds: int, train_seeds: int, **_):
    data = load_dataset("digits", seed=0)
    aux = (data.x_test, data.y_test)  # the server's auxiliary data for LLG+; victims come from train
    rows = []
    for arch in TRAIN:
        for t in range(train_seeds):
            t0 = time.perf_counter()
            ckpts = train_checkpoints(arch, t, data)
            print(f"{arch} train seed {t}: " + ", ".join(f"{k:.1f}->{v['test_acc']:.2f}@{v['step']}"
                                                         for k, v in ckpts.items())
                  + f" ({time.perf_counter() - t0:.1f} s)", flush=True)
            for target, ck in ckpts.items():
                for s in range(seeds):
                    # build_case's batch for seed s (its choice does not depend on the model)
                    case = build_case(model="lenet", dataset="digits", batch_size=VICTIM_BATCH, seed=s)
                    x, y = case.images, case.labels
                    for threat in ("gradient", "update"):
                        obs = observe(arch, ck["state"], x, y, threat, data)
                        row = {"arch": arch, "train_seed": t, "target": target, "test_acc": ck["test_acc"],
                               "step": ck["step"], "seed": s, "threat": threat, "labels": y.tolist()}
                        for name, opts in METHODS.items():
                            opts = {**opts, "aux": aux} if opts["method"] == "llg+" else opts
                            pred = batch_labels(obs, **opts)
                            row[name] = label_accuracy(pred, y)
                        g = torch.Generator().manual_seed(50_000 + 1_000 * t + s)
                        row["random"] = label_accuracy(torch.randint(data.num_classes, (len(y),), generator=g), y)
                        row.update(sign_detection(obs, x, y))
                        rows.append(row)
    return rows, labels_tables(rows, seeds, train_seeds)


def labels_tables(rows, seeds, train_seeds) -> str:
    names = [*METHODS, "random"]
    n = seeds * train_seeds

    def cells(arch, threat, target):
        sel = [r for r in rows if (r["arch"], r["threat"], r["target"]) == (arch, threat, target)]
        return sel, mean([r["test_acc"] for r in sel])

    acc_rows, exact_rows, p1_rows = [], [], []
    for arch in TRAIN:
        for threat in ("gradient", "update"):
            for target in TARGETS:
                sel, acc = cells(arch, threat, target)
                head = f"| {arch} | {threat} | {100 * acc:.0f}% | "
                acc_rows.append(head + " | ".join(f"{100 * mean([r[k] for r in sel]):.1f}" for k in names) + " |")
                exact_rows.append(head + " | ".join(f"{sum(r[k] == 1.0 for r in sel)}/{len(sel)}" for k in names)
                                  + " |")
                cls = [c for r in sel for c in r["classes"].values()]
                conf = [f"{statistics.median(v):.2f} ({len(v)})" if v else "-"
                        for v in ([c["min_p_true"] for c in cls if not c["detected"]],
                                  [c["min_p_true"] for c in cls if c["detected"]])]
                p1_rows.append(head + f"{100 * mean([r['p1_recall'] for r in sel]):.0f}% | "
                                      f"{100 * mean([r['p1_precision'] for r in sel]):.0f}% | {conf[0]} | {conf[1]} |")
    cols = ["model", "threat", "test acc"]
    caption = (f"digits 8x8, batch {VICTIM_BATCH}; update = {UPDATE_STEPS} local SGD steps of "
               f"{UPDATE_LOCAL_BATCH} (2 epochs), lr {UPDATE_LR}; "
               f"{train_seeds} trained models x {seeds} batches = {n} per row; "
               "test acc = mean test accuracy of the checkpoints")
    md = md_table("Label accuracy (%, multiset overlap), " + caption, cols + names, acc_rows)
    md += "\n\n" + md_table("Batches recovered exactly (all 8 labels)", cols + names, exact_rows)
    md += "\n\n" + md_table("(P1) classes with a negative weight-row sum: recall over the batch's classes and "
                            "precision; then, over present classes missed / detected by that sign, the median of "
                            "the class's least confident sample's softmax on its true class (count)",
                            cols + ["recall", "precision", "missed: min p_true", "detected: min p_true"], p1_rows)
    return md


# ================================================================ dropout
def dropout_case(place: str, p: float, batch: int, seed: int):
    """build_case's batch and weights, the model rebuilt with dropout at ``place``, true masks."""
    case = build_case(model="lenet", dataset="digits", image_size=DROPOUT_SIZE, batch_size=batch, seed=seed,
                      labels_known=True, init="uniform")
    net = build_model("lenet", 1, DROPOUT_SIZE, 10, dropout=p, dropout_at=place, init="uniform", seed=seed).eval()
    # the placement must not change the weights, or the two placements would not compare
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), case.observation.model.parameters()))
    shape = (1, DROPOUT_SIZE, DROPOUT_SIZE)
    gen = torch.Generator().manual_seed(20_000 + seed)
    masks = [torch.bernoulli(torch.full((batch, *s), 1.0 - p), generator=gen) for s in dropout_shapes(net, shape)]
    grads = batch_gradients(net, leaf_parameters(net), case.images, case.labels, masks=masks, create_graph=False)
    obs = Observation.from_gradients(net, grads, input_shape=shape, num_classes=10, batch_size=batch,
                                     labels=case.labels, dropout=p)
    return obs, case.images, case.labels, masks


ATTACKS = {"ig": {}, "dia": {}, "ig_true_masks": {"tv": 1e-5}}  # column -> settings (masks added at run time)


def exp_dropout(seeds: int, iterations: int, batches: tuple[int, ...], places=PLACES, rates=RATES,
                attacks=tuple(ATTACKS), **_):
    rows = []
    attacks = {a: ATTACKS[a] for a in attacks}
    for place in places:
        for p in rates:
            for b in batches:
                for s in range(seeds):
                    obs, x, y, masks = dropout_case(place, p, b, s)
                    for name, cfg in attacks.items():
                        cfg = {**cfg, "dropout_masks": masks} if name == "ig_true_masks" else cfg
                        rec = build_attack(name.replace("_true_masks", ""), iterations=iterations, seed=s,
                                           **cfg).reconstruct(obs)
                        sc = evaluate(rec.images, x, rec.hard_labels(), y)
                        rows.append({"place": place, "p": p, "batch": b, "seed": s, "attack": name,
                                     "psnr": sc["psnr"], "ssim": sc["ssim"], "wall_s": rec.wall_s,
                                     "iterations": rec.iterations})
                    print("dropout", place, p, b, s,
                          {r["attack"]: round(r["psnr"], 1) for r in rows[-len(attacks):]}, flush=True)
    table = []
    for place in places:
        for p in rates:
            for b in batches:
                sel = [r for r in rows if (r["place"], r["p"], r["batch"]) == (place, p, b)]
                cells = " | ".join(f"{mean([r['psnr'] for r in sel if r['attack'] == a]):.1f} / "
                                   f"{mean([r['ssim'] for r in sel if r['attack'] == a]):.2f}" for a in attacks)
                table.append(f"| {place} | {p} | {b} | {cells} | {mean([r['wall_s'] for r in sel]):.1f} |")
    titles = {"ig": "plain IG (dropout off)", "dia": "DIA",
              "ig_true_masks": "IG with the true masks, TV 1e-5 (upper bound)"}
    md = md_table(f"Dropout: sigmoid LeNet (uniform init) on digits {DROPOUT_SIZE}x{DROPOUT_SIZE}, gradient threat, "
                  f"labels known, {iterations} iterations, {seeds} seeds; hidden = dropout after conv1 and conv2, "
                  "classifier = before fc; cells are mean PSNR dB / mean SSIM",
                  ["dropout at", "p", "batch", *(titles[a] for a in attacks), "mean s per attack"], table)
    return rows, md


EXPERIMENTS = {"labels": exp_labels, "dropout": exp_dropout}
DEFAULT_SEEDS = {"labels": 10, "dropout": 3}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("which", choices=[*EXPERIMENTS, "all"])
    ap.add_argument("--seeds", type=int, default=None, help="victim batches (labels: 10, dropout: 3)")
    ap.add_argument("--train-seeds", type=int, default=3, help="labels: trained models per architecture")
    ap.add_argument("--iterations", type=int, default=1000, help="dropout: attack iterations")
    ap.add_argument("--batches", default="1,2,4", help="dropout: comma-separated batch sizes")
    ap.add_argument("--places", default=",".join(PLACES), help="dropout: comma-separated dropout_at values")
    ap.add_argument("--rates", default=",".join(map(str, RATES)), help="dropout: comma-separated rates")
    ap.add_argument("--attacks", default=",".join(ATTACKS), help=f"dropout: some of {', '.join(ATTACKS)}")
    ap.add_argument("--out", default=str(Path(__file__).parent / "out_labels_dropout"))
    args = ap.parse_args()
    unknown = set(args.attacks.split(",")) - set(ATTACKS)
    if unknown:
        ap.error(f"unknown attacks {sorted(unknown)}; choose from {', '.join(ATTACKS)}")
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in (list(EXPERIMENTS) if args.which == "all" else [args.which]):
        t0 = time.perf_counter()
        rows, md = EXPERIMENTS[name](seeds=args.seeds or DEFAULT_SEEDS[name], train_seeds=args.train_seeds,
                                     iterations=args.iterations,
                                     batches=tuple(int(b) for b in args.batches.split(",")),
                                     places=tuple(args.places.split(",")),
                                     rates=tuple(float(r) for r in args.rates.split(",")),
                                     attacks=tuple(args.attacks.split(",")))
        wall = time.perf_counter() - t0
        md += f"\n\n({wall:.0f} s on this machine)\n"
        raw = {"wall_s": wall, "args": vars(args), "rows": rows}
        write_atomic(out / f"{name}.json", json.dumps(raw, separators=(",", ":")))
        write_atomic(out / f"{name}.md", md)
        print(md, flush=True)


if __name__ == "__main__":
    main()
