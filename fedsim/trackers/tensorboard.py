"""TensorBoard tracker (``output.trackers: [tensorboard]``; ``pip install 'fedsim[tensorboard]'``).

Event files in ``<run>/tensorboard/`` (``tensorboard --logdir runs/`` shows every run; a sweep's runs are
under ``sweeps/<name>/runs/``), written with torch's ``SummaryWriter``: every number of each metrics.jsonl row
as a scalar with the round as its step (nested fields under their parent: ``train_metrics/train_loss``),
and when the run ends the audit's worst figures per audited round (``audit/psnr`` ...) and each
reconstruction grid as an image (``audit/client-<id>``, at its round's step). A resumed run
(``fedsim resume``) appends to the same folder, purging the steps after the checkpoint it continues from,
so a round redone is shown once.
"""

from __future__ import annotations

from typing import Any

from .base import Tracker, audit_by_round, numbers, reconstructions

LOG_DIR = "tensorboard"


class TensorBoardTracker(Tracker):
    state_key = "tracker.tensorboard"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.last_round = 0
        self.writer = None

    def _open(self, purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.out_dir / LOG_DIR), purge_step=purge_step)

    def on_start(self, arrays) -> None:
        self._open()

    def on_round(self, record) -> None:
        for name, value in numbers(record.row, "/"):
            self.writer.add_scalar(name, value, record.server_round)
        self.writer.flush()  # each round readable as soon as it is done
        self.last_round = record.server_round

    def state_dict(self) -> int:
        return self.last_round

    def load_state_dict(self, state: int) -> None:
        """Continue after the checkpoint's round: whatever a killed run logged past it is purged."""
        self.last_round = int(state)
        self._open(purge_step=self.last_round + 1)

    def finish(self, summary: dict[str, Any]) -> None:
        import numpy as np
        from PIL import Image

        for server_round, figures in audit_by_round(self.audit_rows()).items():
            for name, value in figures.items():
                self.writer.add_scalar(f"audit/{name}", value, server_round)
        for server_round, client, path in reconstructions(self.out_dir):
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
            self.writer.add_image(f"audit/client-{client}", pixels, server_round, dataformats="HWC")
        self.writer.close()

    def stopped(self, error: BaseException) -> None:
        if self.writer is not None:
            self.writer.close()
