"""Offline vision data (lrkern.vision_data) and the LANCE experiment fixtures (lrkern.lance.models / training): idx
parsing, the real Fashion-MNIST and MNIST files, deterministic splits and batches, model shapes, and that SmallViT's
block Linears see 3-D [B, L, F] inputs (the layout the LANCE compression layer wraps). CPU only, a few seconds."""
import gzip
import struct

import pytest
import torch
from torch import nn

from lrkern.lance.models import SmallCNN, SmallViT, new_head
from lrkern.lance.training import accuracy, pretrained, pretrained_path, train_epochs
from lrkern.vision_data import (FASHION_MNIST_ENV, Batches, batches, fashion_mnist, mnist_test, read_idx,
                                split)


def _idx_bytes(array: torch.Tensor, type_byte: int = 0x08) -> bytes:
    header = bytes([0, 0, type_byte, array.dim()]) + b"".join(struct.pack(">I", s) for s in array.shape)
    if array.element_size() == 1:
        return header + array.contiguous().numpy().tobytes()
    # Multi-byte idx values are big-endian.
    return header + array.contiguous().numpy().astype(array.numpy().dtype.newbyteorder(">")).tobytes()


# ---------------------------------------------------------------------------------------------------- read_idx


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gz"])
def test_read_idx_roundtrip(tmp_path, compressed):
    images = torch.randint(0, 256, (3, 5, 4), dtype=torch.uint8)
    labels = torch.randint(0, 10, (3,), dtype=torch.uint8)
    for name, arr in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
        data = _idx_bytes(arr)
        path = tmp_path / (name + (".gz" if compressed else ""))
        path.write_bytes(gzip.compress(data) if compressed else data)
        got = read_idx(path)
        assert got.dtype == torch.uint8 and torch.equal(got, arr)


def test_read_idx_big_endian_int32(tmp_path):
    arr = torch.tensor([[1, -2, 70000], [0, 2**31 - 1, -(2**31)]], dtype=torch.int32)
    (tmp_path / "x.idx").write_bytes(_idx_bytes(arr, 0x0C))
    assert torch.equal(read_idx(tmp_path / "x.idx"), arr)


def test_read_idx_bad_magic_names_file(tmp_path):
    path = tmp_path / "not-an-idx-file.bin"
    path.write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="not-an-idx-file.bin.*magic"):
        read_idx(path)
    gz = tmp_path / "bad-magic.gz"
    gz.write_bytes(gzip.compress(b"PK\x03\x04 zip, not idx"))
    with pytest.raises(ValueError, match="bad-magic.gz"):
        read_idx(gz)


def test_read_idx_wrong_length_and_missing(tmp_path):
    path = tmp_path / "short.idx"
    path.write_bytes(_idx_bytes(torch.zeros(4, 2, dtype=torch.uint8))[:-1])
    with pytest.raises(ValueError, match="short.idx"):
        read_idx(path)
    with pytest.raises(FileNotFoundError, match="nope.idx"):
        read_idx(tmp_path / "nope.idx")


# ---------------------------------------------------------------------------------------------------- real files


def _check_set(images, labels, n):
    assert images.shape == (n, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (n,) and labels.dtype == torch.int64
    assert labels.min().item() == 0 and labels.max().item() == 9
    assert torch.bincount(labels, minlength=10).min().item() > n // 20  # every class present
    # Standardised with the training set's constants: roughly zero mean, unit std.
    assert abs(images.mean().item()) < 0.1 and 0.9 < images.std().item() < 1.1


def test_fashion_mnist_files():
    _check_set(*fashion_mnist("train"), 60000)
    _check_set(*fashion_mnist("test"), 10000)


def test_mnist_test_file():
    _check_set(*mnist_test(), 10000)


def test_fashion_mnist_missing_says_how_to_install(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        fashion_mnist("test", root=tmp_path)
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        fashion_mnist("test")
    with pytest.raises(ValueError, match="split"):
        fashion_mnist("validation")


def test_fashion_mnist_root_with_plain_files(tmp_path):
    images = torch.randint(0, 256, (6, 28, 28), dtype=torch.uint8)
    labels = torch.arange(6, dtype=torch.uint8)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(images))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx_bytes(labels))
    x, y = fashion_mnist("test", root=tmp_path)
    assert x.shape == (6, 1, 28, 28) and torch.equal(y, labels.long())


# ---------------------------------------------------------------------------------------------------- split, batches


def test_split_deterministic_and_disjoint():
    images = torch.arange(100).float().view(100, 1)  # each image's value is its index
    labels = torch.arange(100)
    (xa, ya), (xb, yb) = split(images, labels, 80, seed=3)
    assert xa.shape == (80, 1) and yb.shape == (20,)
    assert torch.equal(xa.view(-1).long(), ya) and torch.equal(xb.view(-1).long(), yb)  # pairs stay together
    assert sorted(torch.cat([ya, yb]).tolist()) == list(range(100))  # disjoint and complete
    (_, ya2), (_, yb2) = split(images, labels, 80, seed=3)
    assert torch.equal(ya, ya2) and torch.equal(yb, yb2)
    (_, ya3), _ = split(images, labels, 80, seed=4)
    assert not torch.equal(ya, ya3)
    with pytest.raises(ValueError, match="n_first"):
        split(images, labels, 101, seed=0)


def test_batches_len_drop_last_and_epochs():
    images, labels = torch.arange(10).float().view(10, 1), torch.arange(10)
    keep = batches(images, labels, batch_size=4, shuffle=True, seed=1, drop_last=False)
    drop = batches(images, labels, batch_size=4, shuffle=True, seed=1, drop_last=True)
    assert isinstance(keep, Batches) and len(keep) == 3 and len(drop) == 2
    sizes = [y.shape[0] for _, y in keep]
    assert sizes == [4, 4, 2]
    assert [y.shape[0] for _, y in drop] == [4, 4]
    # Re-iterable: each pass is a new epoch with its own order, covering every example once.
    e1, e2 = (torch.cat([y for _, y in keep]) for _ in range(2))
    assert sorted(e1.tolist()) == sorted(e2.tolist()) == list(range(10))
    assert not torch.equal(e1, e2)
    # Reproducible: a fresh loader with the same seed repeats the same epochs (keep's epochs 1, 2 above).
    again = batches(images, labels, batch_size=4, shuffle=True, seed=1)
    again.set_epoch(1)
    assert torch.equal(torch.cat([y for _, y in again]), e1)
    assert torch.equal(torch.cat([y for _, y in batches(images, labels, 3, shuffle=False)]), labels)
    for x, y in keep:
        assert torch.equal(x.view(-1).long(), y)


# ---------------------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("bn", [True, False], ids=["bn", "nobn"])
def test_small_cnn_shapes(bn):
    model = SmallCNN(num_classes=7, batchnorm=bn)
    assert model(torch.randn(3, 1, 28, 28)).shape == (3, 7)
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert has_bn == bn
    assert model.fc1.in_features == 128 * 3 * 3
    for name in ("conv1", "conv2", "conv3", "fc1", "head"):
        assert isinstance(getattr(model, name), (nn.Conv2d, nn.Linear))


@pytest.mark.parametrize("patch", [4, 7])
def test_small_vit_shapes_and_3d_linears(patch):
    model = SmallViT(num_classes=10, dim=32, depth=2, heads=4, patch=patch)
    tokens = (28 // patch) ** 2 + 1
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=name: seen.__setitem__(n, (inp[0].shape, out.shape)))
             for name, m in model.named_modules() if name.startswith("blocks.") and isinstance(m, nn.Linear)]
    out = model(torch.randn(5, 1, 28, 28))
    for h in hooks:
        h.remove()
    assert out.shape == (5, 10)
    expected = {f"blocks.{i}.{n}" for i in range(2) for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert set(seen) == expected
    for name, (inp, o) in seen.items():
        assert len(inp) == 3 and inp[:2] == (5, tokens), f"{name} got input {tuple(inp)}, expected [5, {tokens}, F]"
        assert len(o) == 3
    assert seen["blocks.0.attn.qkv"][1][-1] == 3 * 32 and seen["blocks.1.mlp.fc1"][1][-1] == 64


def test_new_head_is_seeded():
    model = SmallCNN()
    state = torch.random.get_rng_state()
    h1 = new_head(model, 2, seed=5)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG stream is untouched
    assert model.head is h1 and model(torch.randn(2, 1, 28, 28)).shape == (2, 2)
    h2 = new_head(SmallViT(dim=32, depth=1), 2, seed=5)
    assert h2.weight.shape == (2, 32)
    assert torch.equal(h1.weight, new_head(SmallCNN(), 2, seed=5).weight)
    assert not torch.equal(h1.weight, new_head(SmallCNN(), 2, seed=6).weight)


# ---------------------------------------------------------------------------------------------------- training


def test_train_epochs_and_accuracy():
    torch.manual_seed(0)
    model = SmallCNN(num_classes=4, batchnorm=False)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 4, (64,))
    loader = batches(x, y, 16, seed=0, drop_last=True)
    conv1_before = model.conv1.weight.detach().clone()
    calls = []
    log = train_epochs(model, loader, 2, lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9), lr_schedule="cosine",
                       grad_clip=1.0, params=list(model.fc1.parameters()) + list(model.head.parameters()),
                       step_callback=lambda step, m: calls.append(step))
    losses, times = log
    assert len(losses) == len(times) == 8 and calls == list(range(8))
    assert all(t > 0 for t in times) and log.median_step_ms > 0
    assert torch.equal(model.conv1.weight, conv1_before)  # not in params: frozen for the call...
    assert all(p.requires_grad for p in model.parameters())  # ...and unfrozen afterwards
    assert losses[-1] < losses[0]
    acc = accuracy(model, x, y, batch_size=10)
    assert 0.0 <= acc <= 100.0 and model.training  # mode restored
    # head_slice: only logits 2, 3 compete and predictions are absolute class ids.
    two = y.clamp(2, 3)
    logits_pred = model.eval()(x)[:, 2:4].argmax(1) + 2
    want = 100.0 * (logits_pred == two).float().mean().item()
    assert accuracy(model, x, two, head_slice=slice(2, 4)) == pytest.approx(want)


def test_pretrained_loads_from_cache(tmp_path):
    from safetensors.torch import save_file
    torch.manual_seed(1)
    ref = SmallCNN()
    path = pretrained_path("cnn", epochs=2, seed=0, cache_dir=tmp_path)
    assert "e2" in path.name and "s0" in path.name and path.suffix == ".safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
    got = pretrained("cnn", epochs=2, seed=0, cache_dir=tmp_path, root=tmp_path / "unused")
    assert not got.training
    for k, v in ref.state_dict().items():
        assert torch.equal(got.state_dict()[k], v), k
    with pytest.raises(ValueError, match="name"):
        pretrained("resnet", cache_dir=tmp_path)
