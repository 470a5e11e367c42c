"""The victim case: model, initialisation, private batch, and what the server sees.

Breaching's "case" (Geiping et al., NeurIPS 2020, ``breaching/cases``): this module
plays the client, computes its gradient or its multi-step local-SGD update, and wraps
that as an :class:`~attacks.observation.Observation`, keeping the ground truth (batch,
labels, dropout masks) apart so that only the scorer sees it. Besides the command line
(``attacks.cli``: fedsim's output folder and YAML loader), it is the only module of the
package that imports fedsim (its leaf model zoo, data sets and memory check).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .objective import batch_gradients, dropout_shapes, leaf_parameters, local_sgd_update
from .observation import Observation


@dataclass
class VictimCase:
    observation: Observation
    images: torch.Tensor
    labels: torch.Tensor
    masks: list[torch.Tensor] | None  # dropout masks per layer (gradient threat), else None
    model_name: str
    dataset: str


def build_case(
    *,
    model: str = "lenet",
    dataset: str = "digits",
    batch_size: int = 1,
    seed: int = 0,
    threat: str = "gradient",
    local_steps: int = 1,
    lr: float = 0.1,
    local_batch_size: int | None = None,
    dropout: float = 0.0,
    image_size: int | None = None,
    init: str | None = None,
    labels_known: bool = False,
    distinct_labels: bool = False,
) -> VictimCase:
    """Build the victim case for one seed (model init, batch choice and masks all seeded)."""
    from fedsim.world.data import load_dataset
    from fedsim.world.models import build_model

    if threat not in ("gradient", "update"):
        raise ValueError("threat must be gradient or update")
    _check_memory(model, dataset, image_size)
    data = load_dataset(dataset, seed=0, image_size=image_size)
    if batch_size > len(data.y_train):
        raise ValueError(f"batch_size {batch_size} is larger than the data set ({dataset}: "
                         f"{len(data.y_train)} training images)")
    init = init or ("uniform" if model == "lenet" else "default")
    net = build_model(model, data.channels, data.image_size, data.num_classes,
                      dropout=dropout, init=init, seed=seed).eval()
    gen = torch.Generator().manual_seed(10_000 + seed)
    if distinct_labels:
        if batch_size > data.num_classes:
            raise ValueError("distinct_labels needs batch_size <= number of classes")
        idx = []
        for c in torch.randperm(data.num_classes, generator=gen)[:batch_size].tolist():
            pool = torch.nonzero(data.y_train == c).flatten()
            idx.append(int(pool[torch.randint(len(pool), (1,), generator=gen)]))
        idx = torch.tensor(idx)
    else:
        idx = torch.randperm(len(data.y_train), generator=gen)[:batch_size]
    x, y = data.x_train[idx].clone(), data.y_train[idx].clone()
    shape = (data.channels, data.image_size, data.image_size)
    params = leaf_parameters(net)
    common = dict(input_shape=shape, num_classes=data.num_classes,
                  labels=y if labels_known else None, dropout=dropout,
                  model_name=model, dataset=dataset, seed=seed)

    def draw_masks(n: int):
        if dropout <= 0:
            return None
        return [torch.bernoulli(torch.full((n, *s), 1.0 - dropout), generator=gen)
                for s in dropout_shapes(net, shape)]

    if threat == "gradient":
        masks = draw_masks(batch_size)
        grads = batch_gradients(net, params, x, y, masks=masks, create_graph=False)
        obs = Observation.from_gradients(net, grads, batch_size=batch_size, **common)
    else:
        b = local_batch_size or batch_size
        per_step = [draw_masks(batch_size) for _ in range(local_steps)] if dropout > 0 else None
        masks = None
        delta = local_sgd_update(net, params, x, y, lr=lr, steps=local_steps, batch_size=b,
                                 masks_per_step=per_step, create_graph=False)
        obs = Observation.from_update(net, delta, lr=lr, local_steps=local_steps,
                                      num_samples=batch_size, local_batch_size=b, **common)
    return VictimCase(obs, x, y, masks, model, dataset)


def _check_memory(model: str, dataset: str, image_size: int | None) -> None:
    """Refuse an image size whose data set or model cannot be allocated, before either is
    (``fedsim.world.memory``: a lower bound, one line naming the setting)."""
    from fedsim.world import memory
    from fedsim.world.data import nominal_shape

    n, c, side = nominal_shape(dataset, image_size=image_size)
    key = "image_size" if image_size else "dataset"
    memory.check_fits([
        (key, memory.data_bytes(n, c, side), f"the data set ({n} images of {c}x{side}x{side})"),
        (key, memory.model_bytes(memory.model_parameters(model, c, side, 10, (256,))), f"the {model} model"),
    ])
