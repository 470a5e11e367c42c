"""A SuperNode's own data, from its ``--node-config``.

    --node-config 'partition-id=I'                      partition I of the scenario's data set (demos, tests)
    --node-config 'partition-id=I data-path="/data/x"'  the node's own files, in a format fedsim reads:
                                                        MNIST IDX files (train-/t10k-images-idx3-ubyte[.gz] and
                                                        -labels-idx1-ubyte[.gz]) or CIFAR-10 python batches
                                                        (cifar-10-batches-py/)

With ``data-path`` the node trains on the training part of its files, split into train and
validation with the scenario's ``data.val_fraction`` (seeded by the scenario seed and
``partition-id``, which stays the node's identity for seeds and reports). Its images must
fit the scenario's model (channels, side after ``data.image_size``, class count); the server
keeps evaluating on its own copy of the scenario's data set.

Data that is missing or malformed raises ``NodeDataError`` with the reason: the ClientApp
then answers that round (and every later one) with an error reply carrying it, and the
server records it and goes on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..world.data import DataError, load_dataset
from ..world.partition import train_val_split
from ..world.build import World

_CACHE: dict[tuple, tuple[torch.Tensor, ...]] = {}


class NodeDataError(ValueError):
    """This node's data cannot be used: the message is the reason the server records."""


def detect_format(root: Path) -> str:
    """'mnist' or 'cifar10', from the files under ``root``."""
    if (root / "cifar-10-batches-py").is_dir() or (root / "data_batch_1").exists():
        return "cifar10"
    base = root / "MNIST" / "raw" if (root / "MNIST" / "raw").is_dir() else root
    if any(base.glob("*-idx3-ubyte*")) or any(base.glob("*-idx1-ubyte*")):
        return "mnist"
    raise NodeDataError(f"no MNIST IDX files or CIFAR-10 python batches in {root}")


def local_tensors(world: World, data_path: str, partition_id: int) -> tuple[torch.Tensor, ...]:
    """(x, y, x_val, y_val) of this node's own files; raises NodeDataError saying what is wrong."""
    key = (data_path, id(world), partition_id)
    cached = _CACHE.get(key)
    if cached is not None:
        return cached
    root = Path(data_path).expanduser()
    try:
        if not root.is_dir():
            raise NodeDataError(f"data-path {data_path} is not a folder")
        fmt = detect_format(root)
        try:
            ds = load_dataset(fmt, root=str(root), image_size=world.data.image_size)
        except DataError as exc:
            raise NodeDataError(str(exc)) from None
        want = world.dataset
        if (ds.channels, ds.image_size) != (want.channels, want.image_size):
            raise NodeDataError(f"images are {ds.channels}x{ds.image_size}x{ds.image_size}, the scenario's model "
                                f"takes {want.channels}x{want.image_size}x{want.image_size} (set data.image_size?)")
        if len(ds.y_train) and int(ds.y_train.max()) >= want.num_classes:
            raise NodeDataError(f"label {int(ds.y_train.max())} out of range: the model has {want.num_classes} classes")
        split = train_val_split(np.arange(len(ds.y_train)), world.data.val_fraction, world.split_seed + partition_id)
        if len(split.train) == 0:
            raise NodeDataError("no training samples")
    except NodeDataError as exc:
        raise NodeDataError(f"node data (data-path={data_path}): {exc}") from None
    cached = _CACHE[key] = (ds.x_train[split.train], ds.y_train[split.train],
                            ds.x_train[split.val], ds.y_train[split.val])
    return cached
