"""Small offline image-classification data for the LANCE experiments (spec ``lance.md`` section 6): Fashion-MNIST
(60k/10k) and the MNIST test set (10k), read from local idx files into tensors, plus a deterministic split and a
re-iterable batch loader. Nothing is downloaded.

Where the files come from:

- Fashion-MNIST: the Debian package ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``) installs
  ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` under ``/usr/share/datasets/fashion-mnist``; another folder can
  be given as ``root=`` or ``$LRKERN_FASHION_MNIST_DIR``.
- MNIST test set: ``mnist-t10k-{images-idx3,labels-idx1}-ubyte.gz`` in the shared data folder
  (``lrkern.data.data_file``), or in ``root=``.

Images come back as float32 ``[N, 1, 28, 28]``: pixels scaled to [0, 1], then standardised with each dataset's fixed,
commonly used mean/std (``FASHION_MNIST_MEAN_STD``, ``MNIST_MEAN_STD``; computed once on the training images, not per
call, so a subset is normalised exactly like the full set). Labels are int64 ``[N]``. The whole data set fits in memory
(60k images are 188 MB as float32), so loading is a few seconds and batches are index slices.
"""
from __future__ import annotations

import gzip
import math
import os
from pathlib import Path
from typing import Iterator, Optional, Union

import torch

from lrkern.data import data_file

PathLike = Union[str, os.PathLike]

FASHION_MNIST_DEFAULT_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_ENV = "LRKERN_FASHION_MNIST_DIR"
# Mean and std of the training pixels in [0, 1] (the values torchvision examples use for both data sets).
FASHION_MNIST_MEAN_STD = (0.2860, 0.3530)
MNIST_MEAN_STD = (0.1307, 0.3081)

# idx type byte -> (torch dtype, bytes per element). Multi-byte idx values are big-endian.
_IDX_DTYPES = {
    0x08: (torch.uint8, 1),
    0x09: (torch.int8, 1),
    0x0B: (torch.int16, 2),
    0x0C: (torch.int32, 4),
    0x0D: (torch.float32, 4),
    0x0E: (torch.float64, 8),
}
_GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: PathLike) -> torch.Tensor:
    """The array stored in an idx file (the MNIST format), gzip-compressed or plain (detected from the content, not
    the name).

    Args:
        path: an idx file, e.g. ``train-images-idx3-ubyte.gz``.

    Returns:
        A tensor of the file's shape and type: uint8 ``[N, 28, 28]`` for (Fashion-)MNIST images, uint8 ``[N]`` for
        labels. Other idx types (int8, int16, int32, float32, float64) are read too.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not a valid idx file (bad magic number, unknown type, wrong length); the message names
            the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"idx file {path} does not exist")
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as e:
            raise ValueError(f"{path} looks gzip-compressed but cannot be decompressed: {e}") from e
    # Magic number: two zero bytes, a type byte, then the number of dimensions.
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an idx file: bad magic number {raw[:4].hex() or '(empty file)'} "
                         f"(expected 0000TTDD with type TT in {', '.join(f'{t:02x}' for t in _IDX_DTYPES)})")
    dtype, itemsize = _IDX_DTYPES[raw[2]]
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated idx header ({len(raw)} bytes for {ndim} dimensions)")
    shape = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    expected = math.prod(shape) * itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: idx data is {len(raw) - header} bytes but shape {shape} of {dtype} needs "
                         f"{expected}")
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    # bytearray: frombuffer needs a writable buffer to give a tensor that owns writable memory.
    data = torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8)
    if itemsize > 1:
        # Big-endian on disk: reverse the bytes of each element before reinterpreting them (x86/ARM are little-endian).
        data = data.view(-1, itemsize).flip(-1).contiguous().view(dtype)
    else:
        data = data.view(dtype)
    return data.reshape(shape)


def _to_tensors(images_path: Path, labels_path: Path, mean_std: tuple[float, float]):
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dim() != 3 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images_path} {tuple(images.shape)} and {labels_path} {tuple(labels.shape)} are not an "
                         "image set [N, H, W] with its labels [N]")
    mean, std = mean_std
    x = images.unsqueeze(1).to(torch.float32).div_(255.0).sub_(mean).div_(std)
    return x, labels.to(torch.int64)


def _check_split(split: str) -> str:
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r} is not supported; accepted: 'train', 'test'")
    return "train" if split == "train" else "t10k"


def fashion_mnist(split: str = "train", root: Optional[PathLike] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST ``split`` ("train": 60k, "test": 10k) as (images float32 [N, 1, 28, 28], labels int64 [N]).

    Args:
        split: "train" or "test".
        root: the folder holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` (plain, uncompressed files also
            work); default ``$LRKERN_FASHION_MNIST_DIR``, else ``/usr/share/datasets/fashion-mnist``.

    Raises:
        FileNotFoundError: a file is missing; the message says how to install it.
    """
    prefix = _check_split(split)
    folder = Path(root if root is not None else os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DEFAULT_DIR)
    paths = []
    for kind in ("images-idx3", "labels-idx1"):
        name = f"{prefix}-{kind}-ubyte"
        found = [p for p in (folder / f"{name}.gz", folder / name) if p.is_file()]
        if not found:
            raise FileNotFoundError(
                f"Fashion-MNIST file {name}.gz not found in {folder}. Install the Debian package dataset-fashion-mnist "
                f"(`apt-get install dataset-fashion-mnist`, files under {FASHION_MNIST_DEFAULT_DIR}), or pass root= / "
                f"set ${FASHION_MNIST_ENV} to a folder with the idx files (nothing is downloaded)")
        paths.append(found[0])
    return _to_tensors(*paths, FASHION_MNIST_MEAN_STD)


def mnist_test(root: Optional[PathLike] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The MNIST test set (10k digits) as (images float32 [10000, 1, 28, 28], labels int64 [10000]).

    Args:
        root: a folder holding ``mnist-t10k-{images-idx3,labels-idx1}-ubyte.gz``; default the shared data folder
            (``lrkern.data.data_file``, which also honours ``$LRKERN_DATA_DIR``).

    Raises:
        FileNotFoundError: a file is missing; the message lists where it looked.
    """
    names = ("mnist-t10k-images-idx3-ubyte.gz", "mnist-t10k-labels-idx1-ubyte.gz")
    if root is None:
        paths = [data_file(n) for n in names]
    else:
        paths = [Path(root) / n for n in names]
        for p in paths:
            if not p.is_file():
                raise FileNotFoundError(f"MNIST test file {p.name} not found in root={str(root)!r}")
    return _to_tensors(*paths, MNIST_MEAN_STD)


def split(images: torch.Tensor, labels: torch.Tensor, n_first: int, seed: int = 0):
    """A random but deterministic split of a data set into two disjoint parts (spec 6: MNIST test 8k/2k).

    Args:
        images: ``[N, ...]``.
        labels: ``[N]``.
        n_first: how many examples go to the first part (0 <= n_first <= N).
        seed: seeds the permutation (a private ``torch.Generator``; the global RNG is untouched), so the same seed
            gives the same split on every machine and run.

    Returns:
        ``((images_a [n_first, ...], labels_a [n_first]), (images_b [N - n_first, ...], labels_b [N - n_first]))``.
    """
    n = images.shape[0]
    if labels.shape[0] != n:
        raise ValueError(f"images ({n}) and labels ({labels.shape[0]}) differ in length")
    if not 0 <= n_first <= n:
        raise ValueError(f"n_first={n_first} must be between 0 and the number of examples ({n})")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    a, b = perm[:n_first], perm[n_first:]
    return (images[a], labels[a]), (images[b], labels[b])


class Batches:
    """Mini-batches ``(images [b, ...], labels [b])`` of an in-memory data set, re-iterable (one pass per epoch).

    With ``shuffle``, epoch ``e`` (the e-th ``iter()``, counting from 0) is shuffled by a generator seeded with
    ``seed + e``: each epoch has a different order, and a run is reproducible without touching the global RNG.
    ``set_epoch`` rewinds or skips to an epoch (e.g. when resuming).

    Example:
        >>> loader = Batches(torch.zeros(10, 1, 28, 28), torch.zeros(10, dtype=torch.long), batch_size=4,
        ...                  drop_last=True)
        >>> len(loader), [x.shape[0] for x, _ in loader]
        (2, [4, 4])
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool = True,
                 seed: int = 0, drop_last: bool = False):
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"images ({images.shape[0]}) and labels ({labels.shape[0]}) differ in length")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer")
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.epoch = 0

    def __len__(self) -> int:
        n = self.images.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """The next ``iter()`` yields epoch ``epoch``'s order."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = self.images.shape[0]
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = None
        self.epoch += 1
        for i in range(len(self)):
            lo, hi = i * self.batch_size, min((i + 1) * self.batch_size, n)
            if order is None:  # slices: views, no copy
                yield self.images[lo:hi], self.labels[lo:hi]
            else:
                idx = order[lo:hi]
                yield self.images[idx], self.labels[idx]


def batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool = True, seed: int = 0,
            drop_last: bool = False) -> Batches:
    """A re-iterable loader over ``(images [N, ...], labels [N])``; see ``Batches``."""
    return Batches(images, labels, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last)
