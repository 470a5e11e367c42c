"""Model zoo, sized from the data (channels, image size, classes).

Every model is an ``nn.Sequential`` of named blocks, so a model can be split at any
block by name (FedImpro's low/high split, ``strategies.fedimpro.split_model``; attacks
that read the last linear layer) without per-model code.

- ``mlp``: flatten, hidden layers with ReLU, linear classifier.
- ``lenet``: the sigmoid LeNet of DLG (Zhu et al., "Deep Leakage from Gradients",
  NeurIPS 2019, code ``dlg/models/vision.py``): three 5x5 convs with 12 channels,
  strides 2/2/1, sigmoid activations, one linear layer. ``init: uniform`` gives the
  reference's uniform(-0.5, 0.5) weights.
- ``cnn``: two conv/ReLU/max-pool blocks and a two-layer classifier (the usual FL CNN).
- ``resnet18``: He et al. 2016, CIFAR-style 3x3 stem, GroupNorm instead of BatchNorm
  (Hsieh et al. 2020) so it works with Opacus and non-IID clients.

Dropout (``dropout`` > 0) goes where ``dropout_at`` says:

- ``classifier`` (default): one ``nn.Dropout`` on the classifier's input. For one image,
  the classifier's weight gradient is delta x (mask * h), so its zero columns show the
  mask: Dropout Inversion's easy case.
- ``hidden``: an ``nn.Dropout`` at the end of every hidden block whose output does *not*
  feed the classifier directly (mlp: hidden layers but the last, so it needs two or more;
  lenet: conv1, conv2; cnn: conv1, conv2; resnet18: stem, layer1-3). The block that feeds
  the classifier is left out because dropout there is the ``classifier`` placement again
  (lenet's conv3 output is flattened straight into fc), and ``both`` would then drop the
  same units twice. A mask in front of a convolution (lenet's conv2 and conv3 inputs,
  resnet18) does not show in any gradient row, since a conv's weight gradient sums over
  positions; a mask in front of a linear layer (mlp hidden layers, cnn's conv2 output
  feeding its hidden linear) still shows, for one image, in that layer's zero columns.
- ``both``: ``hidden`` and ``classifier`` together.

Every dropout layer uses the same rate and sits inside an existing named block, so the
block names (and ``split_model``) do not depend on the placement.

Leaf module: imports nothing else of fedsim.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

MODEL_NAMES = ("mlp", "lenet", "cnn", "resnet18")
DROPOUT_PLACES = ("classifier", "hidden", "both")


def build_model(
    name: str,
    in_channels: int,
    image_size: int,
    num_classes: int,
    *,
    dropout: float = 0.0,
    hidden: tuple[int, ...] = (256,),
    init: str = "default",
    seed: int | None = None,
    dropout_at: str = "classifier",
) -> nn.Sequential:
    """Build model ``name`` for inputs of shape (in_channels, image_size, image_size).

    ``dropout`` adds ``nn.Dropout`` layers of that rate where ``dropout_at`` says
    (module docstring; default: before the classifier, the layer Dropout Inversion was
    published on). Dropout layers hold no parameters, so the weights for one ``seed``
    are the same for every placement. ``seed`` makes the initialisation reproducible
    without touching the global RNG state.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if dropout_at not in DROPOUT_PLACES:
        raise ValueError(f"unknown dropout_at {dropout_at!r}; choose one of {', '.join(DROPOUT_PLACES)}")
    if seed is not None:
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
    try:
        # the builders place only the classifier's dropout; the hidden ones are added after
        at_classifier = dropout if dropout_at in ("classifier", "both") else 0.0
        blocks = _BUILDERS[name](in_channels, image_size, num_classes, at_classifier, hidden)
        if dropout > 0 and dropout_at in ("hidden", "both"):
            _add_hidden_dropout(name, blocks, dropout, hidden)
        model = nn.Sequential(OrderedDict(blocks))
        if init == "uniform":
            for param in model.parameters():
                nn.init.uniform_(param, -0.5, 0.5)
        elif init != "default":
            raise ValueError(f"unknown init {init!r}; choose default or uniform")
    finally:
        if seed is not None:
            torch.random.set_rng_state(state)
    return model


# The hidden blocks that get a dropout layer under ``dropout_at: hidden | both``: every
# block with an activation except the one whose output goes straight to the classifier.
_HIDDEN_DROPOUT_BLOCKS = {
    "lenet": ("conv1", "conv2"),
    "cnn": ("conv1", "conv2"),
    "resnet18": ("stem", "layer1", "layer2", "layer3"),
}


def _add_hidden_dropout(name: str, blocks: list[tuple[str, nn.Module]], p: float,
                        hidden: tuple[int, ...]) -> None:
    """Append ``nn.Dropout(p)`` inside the chosen hidden blocks (in place)."""
    if name == "mlp":
        targets = tuple(f"hidden{i}" for i in range(len(hidden) - 1))
        if not targets:
            raise ValueError("dropout_at hidden needs an mlp with two or more hidden layers: the only hidden "
                             "layer feeds the classifier, which is dropout_at classifier")
    else:
        targets = _HIDDEN_DROPOUT_BLOCKS[name]
    by_name = dict(blocks)
    for t in targets:
        by_name[t].append(nn.Dropout(p))


def _classifier(features: int, num_classes: int, dropout: float) -> list[tuple[str, nn.Module]]:
    blocks: list[tuple[str, nn.Module]] = []
    if dropout > 0:
        blocks.append(("dropout", nn.Dropout(dropout)))
    blocks.append(("fc", nn.Linear(features, num_classes)))
    return blocks


def _mlp(c: int, size: int, k: int, dropout: float, hidden: tuple[int, ...]):
    blocks: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
    width = c * size * size
    for i, h in enumerate(hidden):
        blocks.append((f"hidden{i}", nn.Sequential(nn.Linear(width, h), nn.ReLU())))
        width = h
    return blocks + _classifier(width, k, dropout)


def _lenet(c: int, size: int, k: int, dropout: float, hidden: tuple[int, ...]):
    act = nn.Sigmoid
    side = math.ceil(math.ceil(size / 2) / 2)
    return [
        ("conv1", nn.Sequential(nn.Conv2d(c, 12, 5, padding=2, stride=2), act())),
        ("conv2", nn.Sequential(nn.Conv2d(12, 12, 5, padding=2, stride=2), act())),
        ("conv3", nn.Sequential(nn.Conv2d(12, 12, 5, padding=2, stride=1), act())),
        ("flatten", nn.Flatten()),
    ] + _classifier(12 * side * side, k, dropout)


def _cnn(c: int, size: int, k: int, dropout: float, hidden: tuple[int, ...]):
    side = size // 4
    if side < 1:
        raise ValueError(f"cnn needs images of at least 4x4, got {size}x{size}")
    return [
        ("conv1", nn.Sequential(nn.Conv2d(c, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))),
        ("conv2", nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))),
        ("flatten", nn.Flatten()),
        ("hidden", nn.Sequential(nn.Linear(64 * side * side, 128), nn.ReLU())),
    ] + _classifier(128, k, dropout)


class BasicBlock(nn.Module):
    """ResNet basic block with GroupNorm (2 groups per 64 channels as in FedSpeed's code)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(2, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(2, cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.GroupNorm(2, cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def _resnet18(c: int, size: int, k: int, dropout: float, hidden: tuple[int, ...]):
    def layer(cin: int, cout: int, stride: int) -> nn.Sequential:
        return nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1))

    return [
        ("stem", nn.Sequential(nn.Conv2d(c, 64, 3, 1, 1, bias=False), nn.GroupNorm(2, 64), nn.ReLU())),
        ("layer1", layer(64, 64, 1)),
        ("layer2", layer(64, 128, 2)),
        ("layer3", layer(128, 256, 2)),
        ("layer4", layer(256, 512, 2)),
        ("pool", nn.AdaptiveAvgPool2d(1)),
        ("flatten", nn.Flatten()),
    ] + _classifier(512, k, dropout)


_BUILDERS = {"mlp": _mlp, "lenet": _lenet, "cnn": _cnn, "resnet18": _resnet18}
