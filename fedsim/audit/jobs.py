"""An audit job (what the server saw of one target, and the truth to score it against) and ``run_job``,
which attacks, scores and saves the pictures (the whole grid, and the best and worst pairs), in the audit's worker."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


@dataclass
class AuditJob:
    server_round: int
    partition_id: int
    attack: str
    attack_config: dict[str, Any]
    seed: int
    observation: Any                  # attacks.Observation: only what the server saw
    true_images: torch.Tensor | None  # the scorer's side (None: the server has no ground truth)
    true_labels: torch.Tensor | None
    exact_replay: bool
    note: str
    png: str
    perturbed: bool = False           # a defense or a lossy codec changed what travelled: I2F predicts its effect
    membership: Any = None            # fedsim.audit.membership.MembershipCase (loss threshold or LiRA), or None
    device: str = "cpu"               # where the worker attacks (audit.device, else engine.device; auto resolved there)


def run_job(job: AuditJob) -> dict[str, Any]:
    """Attack, score, save the picture; returns the audit.jsonl row."""
    from attacks import build_attack
    from attacks.metrics import evaluate
    from attacks.pictures import save_grid, save_pairs

    from ..world.device import use_device

    torch.set_num_threads(1)
    # The attack computes on the audit's device (auto: what torch sees in this worker); the observation was
    # built on the server's CPU and moves once. The reconstruction comes back on the CPU and is scored there.
    device = use_device(job.device)
    observation = job.observation.to(device)
    rec = build_attack(job.attack, seed=job.seed, **job.attack_config).reconstruct(observation)
    pairs = Path(job.png).with_suffix(".npz")  # the report's best and worst pairs, with their PSNR
    if job.true_images is None:
        scores = dict.fromkeys(("psnr", "psnr_max", "ssim", "cw_ssim", "label_accuracy", "success_rate"))
        save_grid(Path(job.png), None, rec.images)
        save_pairs(pairs, None, rec.images, None)
    else:
        scores = evaluate(rec.images, job.true_images, rec.hard_labels(), job.true_labels)
        aligned = rec.images[np.asarray(scores["matching"])]
        save_grid(Path(job.png), job.true_images, aligned)
        save_pairs(pairs, job.true_images, aligned, scores["psnr_per_image"])
    from attacks.i2f import MAX_INPUTS, predicted_psnr

    i2f_psnr = None
    if job.perturbed and job.true_images is not None and job.true_images.numel() <= MAX_INPUTS:
        # What the defense or codec moved the reconstruction by, predicted from the perturbation
        # (what travelled minus the clean upload recomputed at the true batch).
        from attacks.base import on_device

        with on_device(device):
            i2f_psnr = predicted_psnr(observation, job.true_images.to(device), job.true_labels.to(device))
    membership = {}
    if job.membership is not None:
        import copy

        from .lira import lira
        from .membership import loss_threshold

        infer = lira if job.membership.shadows is not None else loss_threshold
        membership = infer(copy.deepcopy(observation.model), job.membership)  # on the attack's device
    return {"round": job.server_round, "client": job.partition_id, "attack": job.attack,
            "threat": job.observation.threat, "images": int(rec.images.shape[0]),
            "psnr": scores["psnr"], "psnr_max": scores["psnr_max"], "ssim": scores["ssim"],
            "cw_ssim": scores["cw_ssim"],
            "label_accuracy": scores["label_accuracy"], "success_rate": scores["success_rate"],
            "iterations": int(rec.iterations), "stopped": rec.stopped, "wall_s": rec.wall_s, "exact_replay": job.exact_replay,
            "i2f_psnr": i2f_psnr, "support": job.observation.support_fraction(), "note": job.note,
            "reconstruction": str(Path(job.png).name), "pairs": pairs.name, **membership}
