"""Data loaders (embedded, synthetic, local MNIST/CIFAR-10 files written here) and the model zoo."""

import gzip
import pickle

import numpy as np
import pytest
import torch

from fedsim.world.data import DataError, load_dataset
from fedsim.world.models import build_model
from strategies.fedimpro import split_model


def _write_idx(path, array, gz=False):
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as fh:
            fh.write(payload)
    else:
        path.write_bytes(payload)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_files(tmp_path, gz):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), gz)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n), gz)
    ds = load_dataset("mnist", root=str(tmp_path), seed=gz)
    assert ds.x_train.shape == (12, 1, 28, 28) and ds.x_test.shape == (5, 1, 28, 28)
    assert 0.0 <= float(ds.x_train.min()) and float(ds.x_train.max()) <= 1.0
    assert ds.y_train.dtype == torch.int64


def test_mnist_truncated_and_missing(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset("mnist", root=str(tmp_path))
    (tmp_path / "train-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big") * 3 + b"\0" * 7)
    with pytest.raises(DataError, match="truncated"):
        load_dataset("mnist", root=str(tmp_path), seed=1)


def test_cifar10_pickles(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(base / name, "wb") as fh:
            pickle.dump({b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), b"labels": [1, 2, 3, 4]}, fh)
    ds = load_dataset("cifar10", root=str(tmp_path))
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32)
    assert ds.y_test.tolist() == [1, 2, 3, 4]
    (base / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="CIFAR-10"):
        load_dataset("cifar10", root=str(tmp_path), seed=1)


def test_embedded_sets():
    digits = load_dataset("digits")
    assert digits.x_train.shape[1:] == (1, 8, 8) and len(digits.y_train) + len(digits.y_test) == 1797
    up = load_dataset("digits", image_size=32)
    assert up.image_size == 32
    patches = load_dataset("patches")
    assert patches.x_train.shape[1:] == (3, 32, 32) and float(patches.x_train.std()) > 0.1
    a = load_dataset("synthetic", seed=4)
    b = load_dataset("synthetic", seed=5)
    assert not torch.equal(a.x_train, b.x_train)


def test_synthetic_is_learnable():
    ds = load_dataset("synthetic", synthetic_train=400, synthetic_test=200)
    model = build_model("mlp", ds.channels, ds.image_size, ds.num_classes, hidden=(64,), seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    for _ in range(100):
        loss = torch.nn.functional.cross_entropy(model(ds.x_train), ds.y_train)
        opt.zero_grad()
        loss.backward()
        opt.step()
    acc = (model(ds.x_test).argmax(1) == ds.y_test).float().mean()
    assert acc > 0.8


@pytest.mark.parametrize("name", ["mlp", "lenet", "cnn", "resnet18"])
@pytest.mark.parametrize("shape", [(1, 8), (1, 28), (3, 32)])
def test_models_fit_the_data(name, shape):
    c, size = shape
    model = build_model(name, c, size, 10, dropout=0.25, seed=0)
    assert model(torch.rand(2, c, size, size)).shape == (2, 10)
    assert isinstance(model.dropout, torch.nn.Dropout) and model.dropout.p == 0.25


def test_model_seed_and_uniform_init():
    a = build_model("lenet", 3, 32, 10, seed=1)
    b = build_model("lenet", 3, 32, 10, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    u = build_model("lenet", 3, 32, 10, init="uniform", seed=1)
    w = torch.cat([p.detach().flatten() for p in u.parameters()])
    assert -0.5 <= float(w.min()) and float(w.max()) <= 0.5 and float(w.abs().mean()) > 0.2


def test_resnet18_has_no_batchnorm():
    model = build_model("resnet18", 3, 32, 10)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def test_split_model_composes():
    model = build_model("resnet18", 3, 32, 10, seed=0).eval()
    low, high = split_model(model, "layer2")
    x = torch.rand(2, 3, 32, 32)
    assert torch.allclose(high(low(x)), model(x))
    with pytest.raises(ValueError, match="cannot split"):
        split_model(model, "fc")


def _dropout_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout)]


@pytest.mark.parametrize("name,expected", [
    ("mlp", ["hidden0.2", "hidden1.2"]),
    ("lenet", ["conv1.2", "conv2.2"]),
    ("cnn", ["conv1.3", "conv2.3"]),
    ("resnet18", ["stem.3", "layer1.2", "layer2.2", "layer3.2"]),
])
def test_dropout_inside_hidden_layers(name, expected):
    kw = dict(hidden=(16, 16, 8), seed=3)
    plain = build_model(name, 1, 16, 10, **kw)
    at = {place: build_model(name, 1, 16, 10, dropout=0.5, dropout_at=place, **kw)
          for place in ("classifier", "hidden", "both")}
    assert _dropout_names(at["classifier"]) == ["dropout"]  # the default placement, unchanged
    assert _dropout_names(at["hidden"]) == expected
    assert _dropout_names(at["both"]) == expected + ["dropout"]
    x = torch.rand(3, 1, 16, 16)
    for model in at.values():
        # dropout holds no parameters: same weights and names as without it, same eval function
        assert list(model.state_dict()) == list(plain.state_dict())
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), plain.parameters()))
        assert torch.allclose(model.eval()(x), plain.eval()(x))
    torch.manual_seed(0)
    assert not torch.allclose(at["hidden"].train()(x), plain(x))  # and it does drop in training


def test_hidden_dropout_masks_act_where_placed():
    """The lenet's hidden masks multiply conv1's and conv2's activations (what DIA substitutes)."""
    from attacks.objective import dropout_shapes, substitute_dropout

    p = 0.25
    net = build_model("lenet", 1, 16, 10, dropout=p, dropout_at="hidden", init="uniform", seed=0).eval()
    assert dropout_shapes(net, (1, 16, 16)) == [(12, 8, 8), (12, 4, 4)]
    gen = torch.Generator().manual_seed(0)
    masks = [torch.bernoulli(torch.full((2, *s), 1 - p), generator=gen) for s in ((12, 8, 8), (12, 4, 4))]
    x = torch.rand(2, 1, 16, 16, generator=gen)
    h = net.conv1[:2](x) * masks[0] / (1 - p)
    h = net.conv2[:2](h) * masks[1] / (1 - p)
    manual = net.fc(net.flatten(net.conv3(h)))
    with substitute_dropout(net, masks):
        assert torch.allclose(net(x), manual, atol=1e-6)


def test_dropout_placement_errors():
    with pytest.raises(ValueError, match="two or more hidden layers"):
        build_model("mlp", 1, 8, 10, dropout=0.5, dropout_at="hidden", hidden=(32,))
    with pytest.raises(ValueError, match="unknown dropout_at"):
        build_model("lenet", 1, 8, 10, dropout=0.5, dropout_at="conv")
    # no rate, no layers, whatever the placement
    assert _dropout_names(build_model("lenet", 1, 8, 10, dropout_at="both")) == []
