"""Data sets as in-memory image tensors in [0, 1], shape (N, C, H, W), labels int64.

- ``digits``: scikit-learn's 8x8 digits (ships in the wheel; the embedded default).
- ``synthetic``: seeded class-conditional images (smooth class prototypes plus noise).
- ``patches``: 32x32 colour patches cut at seeded places from scikit-learn's two sample
  photographs (``load_sample_images``). Labels are assigned deterministically as
  ``patch index mod 10`` and carry no meaning: the set exists as a natural-image
  (CIFAR-like) target for gradient-inversion attacks, where digits are too easy.
- ``mnist``: the standard IDX files from ``data.root`` (gzipped or not), or the Hugging
  Face hub (``ylecun/mnist``) through flwr-datasets when ``data.source: hub``.
- ``cifar10``: the python-pickle batches (``cifar-10-batches-py``) from ``data.root``, or
  the hub (``uoft-cs/cifar10``).

Leaf module: imports nothing else of fedsim.
"""

from __future__ import annotations

import gzip
import os
import pickle
import stat
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DATASET_NAMES = ("digits", "synthetic", "patches", "mnist", "cifar10")


class DataError(ValueError):
    """A data set cannot be loaded as asked (missing files, bad format)."""


@dataclass(frozen=True)
class ImageDataset:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.x_train.shape[2])


# (samples, channels, side) of each data set as loaded (train and test; patches: _patches' defaults).
_SHAPES = {"digits": (1797, 1, 8), "patches": (1200, 3, 32), "mnist": (70000, 1, 28), "cifar10": (60000, 3, 32)}


def nominal_shape(name: str, *, image_size: int | None = None, synthetic_channels: int = 1,
                  synthetic_size: int = 16, synthetic_train: int = 2000,
                  synthetic_test: int = 500) -> tuple[int, int, int]:
    """(samples, channels, side) of data set ``name`` once loaded, from the sizes alone: what
    ``fedsim.world.memory`` checks before anything is loaded or allocated."""
    if name == "synthetic":
        n, c, side = synthetic_train + synthetic_test, synthetic_channels, synthetic_size
    elif name in _SHAPES:
        n, c, side = _SHAPES[name]
    else:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    return n, c, image_size or side


def load_dataset(
    name: str,
    *,
    root: str | None = None,
    source: str = "local",
    seed: int = 0,
    image_size: int | None = None,
    synthetic_classes: int = 10,
    synthetic_channels: int = 1,
    synthetic_size: int = 16,
    synthetic_train: int = 2000,
    synthetic_test: int = 500,
) -> ImageDataset:
    """Load data set ``name``; ``image_size`` resizes (bilinear) to a square side."""
    key = (name, root, source, seed, image_size, synthetic_classes, synthetic_channels,
           synthetic_size, synthetic_train, synthetic_test)
    return _load_cached(key)


@lru_cache(maxsize=8)
def _load_cached(key: tuple) -> ImageDataset:
    (name, root, source, seed, image_size, s_classes, s_channels, s_size, s_train, s_test) = key
    if name == "digits":
        ds = _digits(seed)
    elif name == "synthetic":
        ds = _synthetic(seed, s_classes, s_channels, s_size, s_train, s_test)
    elif name == "patches":
        ds = _patches(seed)
    elif name in ("mnist", "cifar10"):
        if source == "hub":
            ds = _from_hub(name)
        elif root is None:
            raise DataError(f"root: data set {name!r} needs data.root (a folder with its files) "
                            "or data.source: hub")
        else:
            ds = _mnist_local(Path(root)) if name == "mnist" else _cifar10_local(Path(root))
    else:
        raise DataError(f"unknown data set {name!r}; choose one of {', '.join(DATASET_NAMES)}")
    if image_size is not None and image_size != ds.image_size:
        ds = ImageDataset(ds.name, _resize(ds.x_train, image_size), ds.y_train,
                          _resize(ds.x_test, image_size), ds.y_test, ds.num_classes)
    return ds


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp_(0, 1)


def _make(name: str, x: np.ndarray, y: np.ndarray, test_idx: np.ndarray, num_classes: int) -> ImageDataset:
    mask = np.zeros(len(y), dtype=bool)
    mask[test_idx] = True
    xt = torch.as_tensor(x, dtype=torch.float32)
    yt = torch.as_tensor(y, dtype=torch.int64)
    return ImageDataset(name, xt[~mask].contiguous(), yt[~mask].contiguous(),
                        xt[mask].contiguous(), yt[mask].contiguous(), num_classes)


def _digits(seed: int) -> ImageDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images / 16.0).astype(np.float32)[:, None]
    y = bunch.target.astype(np.int64)
    # A fixed split (not the run seed): the central test set is the same for every run.
    test_idx = np.random.default_rng(1234).permutation(len(y))[: len(y) // 5]
    return _make("digits", x, y, test_idx, 10)


def _synthetic(seed: int, classes: int, channels: int, size: int, n_train: int, n_test: int) -> ImageDataset:
    rng = np.random.default_rng(seed)
    coarse = max(2, size // 4)
    protos = torch.as_tensor(rng.standard_normal((classes, channels, coarse, coarse)), dtype=torch.float32)
    protos = F.interpolate(protos, size=(size, size), mode="bilinear", align_corners=False) * 2.0
    n = n_train + n_test
    y = rng.integers(0, classes, n)
    noise = rng.standard_normal((n, channels, size, size)).astype(np.float32)
    x = torch.sigmoid(protos[y] + torch.as_tensor(noise)).numpy()
    return _make("synthetic", x, y, np.arange(n_train, n), classes)


def _patches(seed: int, n_train: int = 1000, n_test: int = 200, side: int = 32) -> ImageDataset:
    from sklearn.datasets import load_sample_images

    photos = [np.asarray(img, dtype=np.float32) / 255.0 for img in load_sample_images().images]
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    out = np.empty((n, 3, side, side), dtype=np.float32)
    for i in range(n):
        photo = photos[i % len(photos)]
        r = rng.integers(0, photo.shape[0] - side + 1)
        c = rng.integers(0, photo.shape[1] - side + 1)
        out[i] = photo[r : r + side, c : c + side].transpose(2, 0, 1)
    labels = np.arange(n) % 10  # arbitrary, deterministic: patches have no classes
    return _make("patches", out, labels, np.arange(n_train, n), 10)


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An unsigned-byte IDX file of ``ndim`` dimensions, gzipped or not; anything that is not
    one (unreadable, a corrupt or truncated gzip stream, a bad header, too few or too many
    values) is a DataError naming the file."""
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.exists():
            _regular(candidate)
            try:
                if candidate.suffix == ".gz":
                    raw = _inflate_idx(candidate, ndim)
                else:
                    with open(candidate, "rb") as fh:
                        raw = fh.read()
            except (OSError, EOFError, zlib.error) as exc:  # BadGzipFile is an OSError; a cut stream, EOFError
                raise DataError(f"root: {candidate} cannot be read: {_reason(exc)}") from None
            break
    else:
        raise DataError(f"MNIST file not found: {path} (or {path.name}.gz)")
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"root: {candidate} is not an unsigned-byte IDX file")
    if raw[3] != ndim or len(raw) < 4 + 4 * ndim:
        raise DataError(f"root: {candidate} is not a {ndim}-dimensional IDX file (header says {raw[3]}, "
                        f"{len(raw)} bytes)")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"root: {candidate} is truncated or padded: its header says {int(np.prod(dims))} values, "
                        f"it holds {data.size}")
    return data.reshape(dims)


def _regular(path: Path) -> None:
    """DataError unless ``path`` is a regular file: a FIFO would block the open until something
    writes to it, a device would be read without end."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise DataError(f"root: {path} cannot be read: {_reason(exc)}") from None
    if not stat.S_ISREG(mode):
        kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a folder" if stat.S_ISDIR(mode) else
                "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "not a regular file")
        raise DataError(f"root: {path} is {kind}, not a data file")


# Deflate inflates at most about 1032:1: a stream that inflates beyond this is no gzip file of ours.
_DEFLATE_MAX_RATIO = 1032


def _inflate_idx(path: Path, ndim: int) -> bytes:
    """A gzipped IDX file inflated, refused (DataError) once it inflates beyond what its own IDX
    header promises (a decompression bomb, or a file padded past its data) without reading the rest;
    what it promises is also bounded by what its compressed size can hold."""
    limit = os.stat(path).st_size * _DEFLATE_MAX_RATIO
    with gzip.open(path, "rb") as fh:
        head = fh.read(4 + 4 * ndim)
        expected = len(head)
        if len(head) == 4 + 4 * ndim and head[:3] == b"\0\0\x08" and head[3] == ndim:
            dims = [int.from_bytes(head[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
            expected += int(np.prod(dims, dtype=object))
        else:  # not an IDX header of ndim dimensions: _read_idx says so, once the stream is read (a corrupt
            expected = limit  # stream is the better message), up to what its compressed size can hold
        if expected > limit:
            raise DataError(f"root: {path}: its IDX header promises {expected} bytes, more than its "
                            f"{os.stat(path).st_size} compressed bytes can hold")
        parts, got = [head], len(head)
        while got <= expected:
            chunk = fh.read(min(1 << 20, expected + 1 - got))
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        if got > expected:
            raise DataError(f"root: {path} inflates to more than the {expected} bytes its IDX header promises "
                            f"(refused before reading it whole)")
    return b"".join(parts)


def _reason(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200] or type(exc).__name__


def _check_labels(where: Path, images: np.ndarray, labels: np.ndarray, classes: int) -> None:
    """Images and labels pair up one to one, and every label names a class: a mismatch
    would otherwise pair images with the wrong labels, or fail mid-training."""
    if len(images) != len(labels):
        raise DataError(f"root: {where}: {len(images)} images but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        raise DataError(f"root: {where}: labels must be 0..{classes - 1}, found {int(labels.min())}..{int(labels.max())}")


def _mnist_local(root: Path) -> ImageDataset:
    base = root / "MNIST" / "raw" if (root / "MNIST" / "raw").is_dir() else root
    xs, ys = [], []
    for prefix in ("train", "t10k"):
        images = _read_idx(base / f"{prefix}-images-idx3-ubyte", 3)
        labels = _read_idx(base / f"{prefix}-labels-idx1-ubyte", 1)
        _check_labels(base / f"{prefix}-*-idx?-ubyte", images, labels, 10)
        xs.append(images)
        ys.append(labels)
    x = np.concatenate(xs).astype(np.float32)[:, None] / 255.0
    y = np.concatenate(ys).astype(np.int64)
    return _make("mnist", x, y, np.arange(len(ys[0]), len(y)), 10)


def _cifar10_local(root: Path) -> ImageDataset:
    base = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    xs, ys = [], []
    for batch in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        path = base / batch
        if not path.exists():
            raise DataError(f"CIFAR-10 batch not found: {path}")
        _regular(path)
        try:
            fh = open(path, "rb")
        except OSError as exc:
            raise DataError(f"root: {path} cannot be read: {_reason(exc)}") from None
        with fh:
            try:
                d = pickle.load(fh, encoding="bytes")
                xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
                ys.append(np.asarray(d[b"labels"], dtype=np.int64).reshape(-1))
            except Exception as exc:  # corrupt or truncated pickle, missing keys, wrong sizes
                raise DataError(f"root: {path} is not a CIFAR-10 python batch: {_reason(exc)}") from None
        _check_labels(path, xs[-1], ys[-1], 10)
    x = np.concatenate(xs).astype(np.float32) / 255.0
    y = np.concatenate(ys)
    return _make("cifar10", x, y, np.arange(len(y) - len(ys[-1]), len(y)), 10)


_HUB = {"mnist": ("ylecun/mnist", "image", "label"), "cifar10": ("uoft-cs/cifar10", "img", "label")}


def _from_hub(name: str) -> ImageDataset:
    from flwr_datasets import FederatedDataset
    from flwr_datasets.partitioner import IidPartitioner

    repo, image_key, label_key = _HUB[name]
    try:
        fds = FederatedDataset(dataset=repo, partitioners={"train": IidPartitioner(1)})
        splits = [fds.load_split("train"), fds.load_split("test")]
    except Exception as exc:  # offline, hub unreachable
        raise DataError(f"could not load {repo} from the Hugging Face hub: {exc}") from None
    xs, ys = [], []
    for split in splits:
        arr = np.stack([np.asarray(img, dtype=np.float32) / 255.0 for img in split[image_key]])
        xs.append(arr[:, None] if arr.ndim == 3 else arr.transpose(0, 3, 1, 2))
        ys.append(np.asarray(split[label_key], dtype=np.int64))
    x, y = np.concatenate(xs), np.concatenate(ys)
    return _make(name, x, y, np.arange(len(ys[0]), len(y)), 10)
