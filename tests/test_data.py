"""Dataset loaders, on the shared copies and on small files the tests write in the canonical formats."""

import gzip
import struct

import numpy as np
import pytest
import torch
from scipy.io import savemat

from pyro_vae.data import (from_tensor, load_binarized_mnist, load_dataset, load_fashion_mnist, read_binarized_mnist,
                           read_idx)
from pyro_vae.errors import PyroVAEError

from conftest import SHARED_BINARIZED_MNIST


def test_digits(digits):
    assert digits.image_shape == (8, 8) and digits.dim == 64
    assert not digits.binary
    sizes = [len(digits.train), len(digits.valid), len(digits.test)]
    assert sum(sizes) == 1797 and min(sizes) > 100
    for split in ("train", "valid", "test"):
        x, y = digits.split(split)
        assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
        assert y is not None and len(y) == len(x) and set(y.tolist()) == set(range(10))
    # the split is a partition: no image row index is used twice (rows are distinct images)
    assert torch.equal(load_dataset("digits").test, digits.test)


def _amat(path, x):
    path.write_text("\n".join(" ".join(str(v) for v in row) for row in x) + "\n")


def _fake_binary(n, seed):
    return (np.random.RandomState(seed).rand(n, 784) < 0.13).astype(np.uint8)


def test_binarized_mnist_reads_amat_text_and_matlab_files(tmp_path):
    parts = {"train": _fake_binary(6, 0), "valid": _fake_binary(3, 1), "test": _fake_binary(4, 2)}
    _amat(tmp_path / "binarized_mnist_train.amat", parts["train"])
    savemat(tmp_path / "binarized_mnist_valid.mat", {"X": parts["valid"]})
    savemat(tmp_path / "binarized_mnist_test.amat", {"X": parts["test"]})  # MATLAB content, .amat name
    for split, x in parts.items():
        assert np.array_equal(read_binarized_mnist(next(tmp_path.glob(f"*_{split}.*"))), x)
    data = load_binarized_mnist(tmp_path)
    assert data.binary and data.image_shape == (28, 28) and data.train_labels is None
    assert np.array_equal(data.train.numpy(), parts["train"])
    assert np.array_equal(data.test.numpy(), parts["test"])


@pytest.mark.skipif(not SHARED_BINARIZED_MNIST.is_dir(), reason="the shared binarized MNIST copy is not beside the repo")
def test_binarized_mnist_shared_copy():
    data = load_binarized_mnist(SHARED_BINARIZED_MNIST)
    assert (len(data.train), len(data.valid), len(data.test)) == (50_000, 10_000, 10_000)
    assert data.binary and data.dim == 784
    assert 0.11 < data.train.mean().item() < 0.15


def test_binarized_mnist_bad_files(tmp_path):
    with pytest.raises(PyroVAEError, match="no binarized_mnist_train"):
        load_binarized_mnist(tmp_path)
    (tmp_path / "short.amat").write_text("0 1 1\n1 0 0\n")
    with pytest.raises(PyroVAEError, match="784"):
        read_binarized_mnist(tmp_path / "short.amat")
    (tmp_path / "grey.amat").write_text(" ".join(["0.5"] * 784) + "\n")
    with pytest.raises(PyroVAEError, match="0 and 1"):
        read_binarized_mnist(tmp_path / "grey.amat")


def _write_idx(path, array, gz=True):
    codes = {np.uint8: 0x08}
    header = struct.pack(">BBBB", 0, 0, codes[array.dtype.type], array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape)
    opener = gzip.open if gz else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def test_fashion_mnist_reads_idx_files(tmp_path):
    rng = np.random.RandomState(0)
    train_x = rng.randint(0, 256, size=(12, 28, 28)).astype(np.uint8)
    test_x = rng.randint(0, 256, size=(5, 28, 28)).astype(np.uint8)
    train_y = rng.randint(0, 10, size=12).astype(np.uint8)
    test_y = rng.randint(0, 10, size=5).astype(np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", train_x)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", train_y)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", test_x, gz=False)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", test_y, gz=False)
    assert np.array_equal(read_idx(tmp_path / "train-images-idx3-ubyte.gz"), train_x)
    data = load_fashion_mnist(tmp_path)
    assert not data.binary and data.image_shape == (28, 28)
    assert len(data.train) + len(data.valid) == 12 and len(data.test) == 5
    assert torch.allclose(data.test, torch.tensor(test_x.reshape(5, -1) / 255.0, dtype=torch.float32))
    assert data.test_labels.tolist() == test_y.tolist()
    assert torch.equal(data.train_labels, torch.tensor(train_y[: len(data.train)], dtype=torch.long))


def test_idx_with_bad_header_or_size(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04rest")
    with pytest.raises(PyroVAEError, match="magic"):
        read_idx(tmp_path / "bad")
    _write_idx(tmp_path / "ok", np.zeros((2, 3), np.uint8), gz=False)
    (tmp_path / "cut").write_bytes((tmp_path / "ok").read_bytes()[:-1])
    with pytest.raises(PyroVAEError, match="different size"):
        read_idx(tmp_path / "cut")


def test_fashion_mnist_missing_files_names_them(tmp_path, monkeypatch):
    monkeypatch.setattr("pyro_vae.data.FASHION_MNIST_SYSTEM_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(PyroVAEError, match="train-images-idx3-ubyte"):
        load_fashion_mnist(tmp_path)


def test_user_npy_files(tmp_path):
    x = np.random.RandomState(0).rand(30, 6, 5).astype(np.float32)
    np.save(tmp_path / "grey.npy", x)
    data = load_dataset(str(tmp_path / "grey.npy"))
    assert data.image_shape == (6, 5) and data.dim == 30 and not data.binary
    assert len(data.train) + len(data.valid) + len(data.test) == 30
    np.save(tmp_path / "bytes.npy", (x * 255).astype(np.uint8))
    assert load_dataset(str(tmp_path / "bytes.npy")).train.max() <= 1
    torch.save(torch.bernoulli(torch.rand(20, 16)), tmp_path / "bin.pt")
    bin_data = load_dataset(str(tmp_path / "bin.pt"))
    assert bin_data.binary and bin_data.image_shape == (4, 4)


def test_user_data_bad_input(tmp_path):
    with pytest.raises(PyroVAEError, match="does not exist"):
        load_dataset(str(tmp_path / "missing.npy"))
    np.save(tmp_path / "wrong.npy", np.zeros((2, 3, 4, 5)))
    with pytest.raises(PyroVAEError, match="shape"):
        load_dataset(str(tmp_path / "wrong.npy"))
    with pytest.raises(PyroVAEError, match=r"\[0, 1\]"):
        from_tensor(torch.randn(10, 4))
    with pytest.raises(PyroVAEError, match="unknown dataset"):
        load_dataset("mnist-typo")
