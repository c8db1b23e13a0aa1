"""Datasets as tensors: images flattened to (N, D) with values in [0, 1], split into train/valid/test.

Every loader returns a :class:`Dataset` with labels where the data have them, the image shape,
and whether the pixels are binary (which decides the default likelihood).
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import PyroVAEError

BINARIZED_MNIST_URL = (
    "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/binarized_mnist_{split}.amat"
)
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
SPLITS = ("train", "valid", "test")


@dataclass
class Dataset:
    """Train/valid/test images as float tensors of shape (N, D) in [0, 1]; labels may be None."""

    name: str
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    image_shape: tuple[int, int]
    binary: bool
    train_labels: torch.Tensor | None = None
    valid_labels: torch.Tensor | None = None
    test_labels: torch.Tensor | None = None

    @property
    def dim(self) -> int:
        return self.train.shape[1]

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The raw images and labels of a split."""
        if name not in SPLITS:
            raise PyroVAEError(f"unknown split {name!r}; choose one of {', '.join(SPLITS)}")
        return getattr(self, name), getattr(self, f"{name}_labels")

    def as_seen(self, name: str, binarize: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A split as a run saw it held out: under dynamic binarization (``binarize``) one fixed
        Bernoulli draw per pixel (:func:`fixed_binarization`), else the images themselves. Every
        consumer of a trained run (validation, test ELBO, evaluate, analyze, the study) reads data here."""
        x, y = self.split(name)
        return (fixed_binarization(x, name) if binarize else x), y


BINARIZATION_SEEDS = {"valid": 0, "test": 1, "train": 2}


def fixed_binarization(x: torch.Tensor, split: str) -> torch.Tensor:
    """One Bernoulli draw per pixel from a seed fixed per split: held-out data stay the same across
    epochs, runs and commands. Drawn on the CPU (binarize before moving data to a GPU)."""
    gen = torch.Generator(device="cpu").manual_seed(BINARIZATION_SEEDS[split])
    return torch.bernoulli(x.cpu(), generator=gen).to(x.device)


def default_data_root() -> Path:
    return Path(os.environ.get("PYRO_VAE_DATA", Path.home() / ".cache" / "pyro-vae"))


def load_dataset(name: str, data_root: str | os.PathLike | None = None, download: bool = False) -> Dataset:
    """Load a dataset by name (``digits``, ``binarized-mnist``, ``fashion-mnist``) or file path."""
    if name == "digits":
        return load_digits()
    if name == "binarized-mnist":
        return load_binarized_mnist(data_root, download=download)
    if name == "fashion-mnist":
        return load_fashion_mnist(data_root, download=download)
    if name.endswith((".npy", ".pt", ".pth")):
        return load_file(name)
    raise PyroVAEError(
        f"unknown dataset {name!r}; choose digits, binarized-mnist, fashion-mnist or a .npy/.pt file"
    )


# --------------------------------------------------------------------------- splitting helpers


def _three_way_split(x: np.ndarray, y: np.ndarray | None, name: str, image_shape, seed: int = 0) -> Dataset:
    """A fixed 80/10/10 split (the permutation depends on ``seed`` only, never on the run's seed)."""
    n = len(x)
    if n < 3:
        raise PyroVAEError(f"{name}: need at least 3 images to make train/valid/test splits, got {n}")
    perm = np.random.RandomState(seed).permutation(n)
    n_test = max(1, n // 10)
    n_valid = max(1, n // 10)
    idx = {"test": perm[:n_test], "valid": perm[n_test : n_test + n_valid], "train": perm[n_test + n_valid :]}
    return _make_dataset(name, {k: (x[v], None if y is None else y[v]) for k, v in idx.items()}, image_shape)


def _make_dataset(name, parts: dict, image_shape) -> Dataset:
    tensors = {}
    for split, (x, y) in parts.items():
        x = torch.as_tensor(np.ascontiguousarray(x), dtype=torch.float32).reshape(len(x), -1)
        tensors[split] = x
        tensors[f"{split}_labels"] = None if y is None else torch.as_tensor(np.array(y), dtype=torch.long)
    binary = all(bool(((tensors[s] == 0) | (tensors[s] == 1)).all()) for s in SPLITS)
    return Dataset(name=name, image_shape=tuple(image_shape), binary=binary, **tensors)


# --------------------------------------------------------------------------- digits


def load_digits() -> Dataset:
    """scikit-learn's 8x8 handwritten digits (1,797 images, grey levels 0..16 scaled to [0, 1])."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    return _three_way_split(bunch.data / 16.0, bunch.target, "digits", (8, 8))


# --------------------------------------------------------------------------- binarized MNIST


def read_binarized_mnist(path: str | os.PathLike) -> np.ndarray:
    """Read one split of the static binarized MNIST: the canonical ``.amat`` text (784 space-separated
    0/1 per line) or a MATLAB v5 copy (key ``X``), whatever the file's suffix. Returns uint8 (N, 784)."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(10)
    x = _read_matlab(path) if head.startswith(b"MATLAB") else _read_amat(path)
    if x.ndim != 2 or x.shape[1] != 784:
        raise PyroVAEError(f"{path}: expected rows of 784 pixels (28x28), got shape {tuple(x.shape)}")
    if x.dtype.kind not in "biuf" or not np.isin(x, (0, 1)).all():
        raise PyroVAEError(f"{path}: binarized MNIST must hold only 0 and 1")
    return x.astype(np.uint8)


def _read_matlab(path: Path) -> np.ndarray:
    from scipy.io import loadmat

    try:
        contents = loadmat(path)
    except Exception as e:  # scipy raises many kinds on truncated or garbage files
        raise PyroVAEError(f"{path}: not a readable MATLAB file ({type(e).__name__}: {str(e)[:80]})") from None
    if "X" not in contents:
        raise PyroVAEError(f"{path}: MATLAB file has no array 'X'")
    return np.asarray(contents["X"])


def _read_amat(path: Path) -> np.ndarray:
    """The ``.amat`` text: one image per line, 784 values 0 or 1 separated by white space."""
    raw = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    is_digit = (raw == ord("0")) | (raw == ord("1"))
    is_space = np.isin(raw, np.frombuffer(b" \t\r\n", dtype=np.uint8))
    if not (is_digit | is_space).all() or (is_digit[:-1] & is_digit[1:]).any():
        raise PyroVAEError(f"{path}: not a binarized-MNIST .amat file (values other than 0 and 1)")
    line = np.cumsum(raw == ord("\n"))  # the line each byte is on
    counts = np.bincount(line[is_digit], minlength=int(line[-1]) + 1 if len(line) else 1)
    counts = counts[counts > 0]  # blank lines carry no image
    if len(counts) == 0:
        raise PyroVAEError(f"{path}: the file holds no images")
    if (counts != counts[0]).any():
        raise PyroVAEError(f"{path}: rows of unequal length ({counts.min()} to {counts.max()} values)")
    return (raw[is_digit] - ord("0")).reshape(len(counts), -1)


def _download(url: str, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, suffix=".part")
    os.close(fd)
    try:
        print(f"downloading {url}")
        urllib.request.urlretrieve(url, tmp)
        os.replace(tmp, dest)
    except OSError as e:
        raise PyroVAEError(f"could not download {url}: {e}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_binarized_mnist(data_root=None, download: bool = False) -> Dataset:
    """The static binarized MNIST of Larochelle & Murray (2011): 50k/10k/10k, no labels."""
    root = Path(data_root) if data_root else default_data_root() / "binarized_mnist"
    parts = {}
    for split in SPLITS:
        candidates = [root / f"binarized_mnist_{split}.{ext}" for ext in ("amat", "mat")]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None and download:
            found = candidates[0]
            _download(BINARIZED_MNIST_URL.format(split=split), found)
        if found is None:
            raise PyroVAEError(
                f"binarized-mnist: no binarized_mnist_{split}.amat or .mat in {root} "
                "(give --data-root, or --download where a network exists)"
            )
        parts[split] = (read_binarized_mnist(found), None)
    return _make_dataset("binarized-mnist", parts, (28, 28))


# --------------------------------------------------------------------------- Fashion-MNIST

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not."""
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
        raise PyroVAEError(f"{path}: cannot be read ({type(e).__name__}: {str(e)[:80]})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise PyroVAEError(f"{path}: not an IDX file (bad magic number)")
    ndim = data[3]
    offset = 4 + 4 * ndim
    if ndim == 0 or len(data) < offset:
        raise PyroVAEError(f"{path}: IDX header is cut short or names no dimensions")
    dims = struct.unpack(f">{ndim}I", data[4:offset])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    if len(data) - offset != math.prod(dims) * dtype.itemsize:
        raise PyroVAEError(f"{path}: IDX header says shape {dims} but the file holds a different size "
                           f"({len(data) - offset} bytes of data for {math.prod(dims) * dtype.itemsize})")
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(dims)


def _find_idx(roots: list[Path], stem: str) -> Path | None:
    for root in roots:
        for candidate in (root / stem, root / f"{stem}.gz", root / "FashionMNIST" / "raw" / stem):
            if candidate.is_file():
                return candidate
    return None


def load_fashion_mnist(data_root=None, download: bool = False) -> Dataset:
    """Fashion-MNIST from IDX files: 50k train / 10k valid (the last 10k of the training file) / 10k test.

    Looks in ``data_root``, then in Debian's ``/usr/share/datasets/fashion-mnist``; downloads
    through torchvision into ``data_root`` when asked to."""
    root = Path(data_root) if data_root else default_data_root() / "fashion-mnist"
    roots = [root, Path(FASHION_MNIST_SYSTEM_DIR)]
    stems = [s for pair in FASHION_MNIST_FILES.values() for s in pair]
    if download and any(_find_idx(roots, s) is None for s in stems):
        from torchvision.datasets import FashionMNIST

        try:
            FashionMNIST(str(root), train=True, download=True)
        except Exception as e:  # torchvision raises RuntimeError/URLError on no network
            raise PyroVAEError(f"fashion-mnist: download failed: {e}") from None
    arrays = {}
    for stem in stems:
        path = _find_idx(roots, stem)
        if path is None:
            raise PyroVAEError(
                f"fashion-mnist: {stem}(.gz) not found in {root} or {FASHION_MNIST_SYSTEM_DIR} "
                "(apt-get install dataset-fashion-mnist, give --data-root, or --download)"
            )
        arrays[stem] = read_idx(path)
    (tr_x, tr_y), (te_x, te_y) = [(arrays[i], arrays[l]) for i, l in FASHION_MNIST_FILES.values()]
    if tr_x.shape[1:] != (28, 28) or len(tr_x) != len(tr_y) or len(te_x) != len(te_y):
        raise PyroVAEError("fashion-mnist: IDX files do not hold matching 28x28 images and labels")
    for images in (tr_x, te_x):
        _check_pixels(images, "fashion-mnist", 255)
    n_valid = min(10_000, len(tr_x) // 6)
    parts = {
        "train": (tr_x[:-n_valid] / 255.0, tr_y[:-n_valid]),
        "valid": (tr_x[-n_valid:] / 255.0, tr_y[-n_valid:]),
        "test": (te_x / 255.0, te_y),
    }
    return _make_dataset("fashion-mnist", parts, (28, 28))


# --------------------------------------------------------------------------- a user's own data


def from_tensor(x, labels=None, name: str = "tensor") -> Dataset:
    """Images (N, H, W), (N, 1, H, W) or (N, D) with values in [0, 1], or whole numbers in 0..255
    (integers, or floats holding whole numbers)."""
    try:
        x = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x)
    except (ValueError, TypeError, RuntimeError) as e:
        raise PyroVAEError(f"{name}: not an array of images ({type(e).__name__})") from None
    if x.dtype.kind not in "biuf":
        raise PyroVAEError(f"{name}: pixels must be real numbers, got an array of {x.dtype} values")
    if x.ndim == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.ndim == 3:
        image_shape = x.shape[1:]
    elif x.ndim == 2:
        side = int(round(np.sqrt(x.shape[1])))
        image_shape = (side, side) if side * side == x.shape[1] else (1, x.shape[1])
    else:
        raise PyroVAEError(f"{name}: expected images of shape (N, H, W) or (N, D), got {x.shape}")
    if x.size == 0:
        raise PyroVAEError(f"{name}: data are empty")
    _check_pixels(x, name, 255)
    if x.max() > 1:  # 0..255
        if (x.dtype.kind == "f" and (x != np.round(x)).any()):
            raise PyroVAEError(f"{name}: pixel values must lie in [0, 1], or be whole numbers in 0..255 "
                               f"(got values up to {x.max():.4g} that are not whole)")
        x = x / 255.0
    y = None if labels is None else np.asarray(labels)
    if y is not None and len(y) != len(x):
        raise PyroVAEError(f"{name}: {len(y)} labels for {len(x)} images")
    return _three_way_split(x, y, name, image_shape)


def _check_pixels(x: np.ndarray, name: str, top: int) -> None:
    """Finite and within [0, top]; one line naming the problem otherwise."""
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise PyroVAEError(f"{name}: data hold NaN or infinite values")
    if x.min() < 0 or x.max() > top:
        raise PyroVAEError(f"{name}: pixel values must lie in [0, 1] or 0..{top}, got [{x.min():.3g}, {x.max():.3g}]")


def load_file(path: str | os.PathLike) -> Dataset:
    """A ``.npy`` array or a ``.pt`` tensor of images (see :func:`from_tensor`)."""
    path = Path(path)
    if not path.is_file():
        raise PyroVAEError(f"data file {path} does not exist")
    try:
        x = np.load(path) if path.suffix == ".npy" else torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise PyroVAEError(f"{path}: cannot read it as an array ({e.__class__.__name__})") from None
    return from_tensor(x, name=str(path))
