"""``python -m attacks``: build a victim case, attack it, score it, write the results.

The evaluation protocol of DLG (Zhu et al., NeurIPS 2019) and Inverting Gradients
(Geiping et al., NeurIPS 2020): one seeded model, one seeded private batch, the upload
the server would see, one attack, and the reconstruction scored against the truth
(``attacks.metrics``). Writes DIR/results.json (atomically) and DIR/reconstruction.png
(true images on top, matched reconstructions below). Settings come from flags or a
YAML file (``--config``; flags given explicitly win). Bad arguments print one line and
exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from .base import ATTACKS, build_attack, check_config
from .metrics import evaluate
from .pictures import save_grid

MODELS = ("mlp", "lenet", "cnn", "resnet18")
DATASETS = ("digits", "synthetic", "patches", "mnist", "cifar10")


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        raise UsageError(message)


def _positive_int(text):
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _nonneg_int(text):
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def _image_size(text):
    from fedsim.scenario.schema import IMAGE_SIZE_MIN  # the scenario's own bound (data.image_size)

    v = int(text)
    if v < IMAGE_SIZE_MIN:
        raise argparse.ArgumentTypeError(f"must be >= {IMAGE_SIZE_MIN} (as data.image_size), got {v}")
    return v


def _seed(text):
    from fedsim.scenario.schema import SEED_MAX  # what the random generators take

    v = _nonneg_int(text)
    if v > SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be <= {SEED_MAX} (2**63 - 1), got {v}")
    return v


def _device(text):
    from fedsim.world.device import device_problem  # engine.device's names and check

    problem = device_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def _dropout(text):
    v = float(text)
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {v}")
    return v


def _nonneg_float(text):
    v = float(text)
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {v}")
    return v


def _positive_float(text):
    v = float(text)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m attacks", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML file with the same settings (keys as the long flags)")
    p.add_argument("--attack", choices=sorted(ATTACKS))
    p.add_argument("--model", choices=MODELS)
    p.add_argument("--dataset", choices=DATASETS)
    p.add_argument("--batch-size", type=_positive_int)
    p.add_argument("--seed", type=_seed)
    p.add_argument("--threat", choices=("gradient", "update"))
    p.add_argument("--local-steps", type=_positive_int)
    p.add_argument("--local-lr", type=_positive_float, help="client SGD lr for --threat update")
    p.add_argument("--local-batch-size", type=_positive_int)
    p.add_argument("--dropout", type=_dropout)
    p.add_argument("--image-size", type=_image_size, help="resize the data set (e.g. digits to 32)")
    p.add_argument("--init", choices=("default", "uniform"))
    p.add_argument("--labels-known", action="store_true", default=None)
    p.add_argument("--true-masks", action="store_true", default=None,
                   help="give ig the client's dropout masks (upper bound)")
    p.add_argument("--iterations", type=_positive_int, help="optimisation steps (L-BFGS steps for dlg/idlg)")
    p.add_argument("--restarts", type=_nonneg_int)
    p.add_argument("--stop-patience", type=_nonneg_int,
                   help="stop once the loss has not improved for this many iterations (0: run the whole budget)")
    p.add_argument("--stop-tol", type=_nonneg_float, help="relative improvement that counts for --stop-patience")
    p.add_argument("--threads", type=_positive_int)
    p.add_argument("--device", type=_device, help="where the attack computes: auto (cuda if torch sees one, else "
                   "mps, else cpu), cpu, cuda, cuda:N, mps; the case is built and scored on the CPU")
    p.add_argument("--out", help="output folder (default runs/attacks/<attack>-<model>-<dataset>-b<B>-s<S>)")
    p.add_argument("--overwrite", action="store_true", default=None,
                   help="replace the results of an earlier attack in the output folder (cleared first)")
    return p


DEFAULTS = dict(attack="dlg", model="lenet", dataset="digits", batch_size=1, seed=0, threat="gradient",
                local_steps=1, local_lr=0.1, local_batch_size=None, dropout=0.0, image_size=None,
                init=None, labels_known=False, true_masks=False, iterations=None, restarts=None,
                stop_patience=None, stop_tol=None, threads=None, device="auto", out=None, overwrite=False,
                attack_config={})


def resolve(argv: list[str] | None) -> dict:
    """Flags over YAML over defaults; validates types and ranges (UsageError on bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    settings = dict(DEFAULTS)
    if args.config:
        import yaml

        from fedsim.scenario import strict_yaml

        try:
            loaded = strict_yaml.load(Path(args.config).read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:  # duplicate keys and alias bombs included (fedsim.scenario.strict_yaml)
            raise UsageError(f"config {args.config}: {strict_yaml.describe(exc)}")
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"cannot read config {args.config}: {(str(exc).splitlines() or [''])[0][:200]}")
        if not isinstance(loaded, dict):
            raise UsageError(f"config {args.config} must be a mapping")
        flat: list[str] = []
        for key, value in loaded.items():
            key = str(key).replace("-", "_")
            if key not in DEFAULTS or key == "config":
                raise UsageError(f"config key {key!r} is unknown; allowed: {', '.join(sorted(DEFAULTS))}")
            if key == "attack_config":
                if not isinstance(value, dict):
                    raise UsageError("config key 'attack_config' must be a mapping")
                settings[key] = value
            elif isinstance(value, bool):
                if value:
                    flat.append("--" + key.replace("_", "-"))
            elif value is not None:
                flat += ["--" + key.replace("_", "-"), str(value)]
        from_yaml = vars(parser.parse_args(flat))
        settings.update({k: v for k, v in from_yaml.items() if v is not None and k != "config"})
    settings.update({k: v for k, v in vars(args).items() if v is not None and k != "config"})
    if settings["threat"] == "update" and settings["attack"] in ("dlg", "idlg", "dia"):
        raise UsageError(f"--attack {settings['attack']} needs --threat gradient")
    if settings["threat"] == "gradient" and settings["attack"] == "sme":
        raise UsageError("--attack sme needs --threat update")
    if settings["attack"] == "dia" and settings["dropout"] <= 0:
        raise UsageError("--attack dia needs --dropout > 0")
    if settings["true_masks"] and (settings["attack"] != "ig" or settings["dropout"] <= 0
                                   or settings["threat"] != "gradient"):
        raise UsageError("--true-masks needs --attack ig, --threat gradient and --dropout > 0")
    lbs = settings["local_batch_size"]
    if lbs is not None and lbs > settings["batch_size"]:
        raise UsageError("--local-batch-size must be <= --batch-size")
    if settings["out"] is None:
        s = settings
        settings["out"] = f"runs/attacks/{s['attack']}-{s['model']}-{s['dataset']}-b{s['batch_size']}-s{s['seed']}"
    try:  # the attack's own settings, before any work (the dropout masks it may get come with the case)
        check_config(settings["attack"], attack_config(settings, None))  # types: a str where a number goes
        ATTACKS[settings["attack"]](**attack_config(settings, None))
    except (TypeError, ValueError) as exc:
        raise UsageError(f"attack_config: {(str(exc).splitlines() or [type(exc).__name__])[0][:200]}")
    from fedsim.run.outdir import OutputDirError, check_output_dir

    try:  # the output folder too: found unusable now, not after the attack ran
        check_output_dir(settings["out"], overwrite=settings["overwrite"])
    except OutputDirError as exc:
        raise UsageError(f"output folder {exc}")
    return settings


def attack_config(settings: dict, case) -> dict:
    cfg = {"seed": settings["seed"]}
    if settings["iterations"] is not None:
        cfg["steps" if settings["attack"] in ("dlg", "idlg") else "iterations"] = settings["iterations"]
    for key in ("restarts", "stop_patience", "stop_tol"):
        if settings[key] is not None:
            cfg[key] = settings[key]
    if settings["true_masks"] and case is not None:
        from fedsim.world.device import resolve_device

        cfg["dropout_masks"] = [m.to(resolve_device(settings["device"])) for m in case.masks]
    cfg.update(settings["attack_config"])
    return cfg


def write_json_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o644)  # mkstemp makes 0600 files
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, indent=2, allow_nan=False)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def run(settings: dict) -> dict:
    from .case import build_case

    if settings["threads"]:
        torch.set_num_threads(settings["threads"])
    case = build_case(model=settings["model"], dataset=settings["dataset"],
                      batch_size=settings["batch_size"], seed=settings["seed"],
                      threat=settings["threat"], local_steps=settings["local_steps"],
                      lr=settings["local_lr"], local_batch_size=settings["local_batch_size"],
                      dropout=settings["dropout"], image_size=settings["image_size"],
                      init=settings["init"], labels_known=settings["labels_known"])
    attack = build_attack(settings["attack"], **attack_config(settings, case))
    from fedsim.run.outdir import claim_output_dir

    # Held from before the attack until its results are written: no other run writes here meanwhile.
    with claim_output_dir(settings["out"], overwrite=settings["overwrite"]) as out:
        return _attack_and_write(settings, case, attack, out)


def _attack_and_write(settings: dict, case, attack, out: Path) -> dict:
    from fedsim.world.device import use_device

    rec = attack.reconstruct(case.observation.to(use_device(settings["device"])))  # comes back on the CPU
    scores = evaluate(rec.images, case.images, rec.hard_labels(), case.labels)
    order = torch.as_tensor(scores["matching"])
    save_grid(out / "reconstruction.png", case.images, rec.images[order])
    psnr_v = scores["psnr"]
    results = {
        "attack": settings["attack"], "model": settings["model"], "dataset": settings["dataset"],
        "batch_size": settings["batch_size"], "seed": settings["seed"], "threat": settings["threat"],
        "local_steps": settings["local_steps"], "dropout": settings["dropout"],
        "psnr": psnr_v, "psnr_max": scores["psnr_max"] if np.isfinite(scores["psnr_max"]) else None,
        "ssim": scores["ssim"], "cw_ssim": scores["cw_ssim"], "label_accuracy": scores["label_accuracy"],
        "success_rate": scores["success_rate"], "success_threshold_db": 20.0,
        "lpips": scores["lpips"], "iterations": rec.iterations, "stopped": rec.stopped, "restarts": rec.restarts,
        "wall_s": rec.wall_s, "final_loss": rec.loss_trace[-1] if rec.loss_trace else None,
        "true_labels": case.labels.tolist(),
        "recovered_labels": None if rec.hard_labels() is None else rec.hard_labels().tolist(),
        "settings": {k: v for k, v in settings.items() if k not in ("attack_config", "overwrite")} | {
            "attack_config": settings["attack_config"]},
    }
    results = json.loads(json.dumps(results, default=float).replace("NaN", "null").replace("Infinity", "null"))
    write_json_atomic(out / "results.json", results)
    return results


def main(argv: list[str] | None = None) -> int:
    try:
        settings = resolve(argv)
        results = run(settings)
    except KeyboardInterrupt:
        print("python -m attacks: interrupted; no results written", file=sys.stderr)
        return 130
    except UsageError as exc:  # argparse echoes arguments: one line, cut like every other message
        print(f"python -m attacks: error: {(str(exc).splitlines() or [''])[0][:500]}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as exc:  # e.g. data set files missing, bad model size
        print(f"python -m attacks: error: {str(exc).splitlines()[0][:500] if str(exc) else type(exc).__name__}",
              file=sys.stderr)
        return 2
    print(f"{results['attack']}: psnr {results['psnr']:.2f} dB, ssim {results['ssim']:.3f}, "
          f"cw-ssim {results['cw_ssim']:.3f}, "
          f"label accuracy {results['label_accuracy']}, {results['iterations']} iterations "
          f"(stopped: {results['stopped']}), "
          f"{results['wall_s']:.1f} s -> {settings['out']}/results.json")
    return 0
