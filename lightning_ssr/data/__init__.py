"""Offline data for continual learning: scikit-learn's digits, MNIST-style IDX files, benchmarks.

Nothing here downloads anything. The digits ship inside scikit-learn; MNIST and Fashion-MNIST are
read from a local directory of IDX files (``apt-get install dataset-fashion-mnist`` installs
Fashion-MNIST in ``/usr/share/datasets/fashion-mnist``). :func:`make_benchmark` turns either into
an Avalanche benchmark (Split or Permuted; task-, domain- or class-incremental).
"""

from typing import TYPE_CHECKING

from lightning_ssr._lazy import lazy_exports

if TYPE_CHECKING:
    from lightning_ssr.data.names import DATASETS, PROTOCOLS, SCENARIOS
    from lightning_ssr.data.benchmarks import ContinualBenchmark, load_dataset, make_benchmark, stream_length
    from lightning_ssr.data.digits import load_digits
    from lightning_ssr.data.idx import IDX_DATASETS, IDX_FILES, DatasetNotFoundError, IdxDataset, default_cache_dir, find_idx_files, load_idx_dataset, prepare_torchvision_root, read_idx, write_idx
    from lightning_ssr.data.tensors import TensorSplit

__all__ = [
    "DATASETS",
    "IDX_DATASETS",
    "IDX_FILES",
    "PROTOCOLS",
    "SCENARIOS",
    "ContinualBenchmark",
    "DatasetNotFoundError",
    "IdxDataset",
    "TensorSplit",
    "default_cache_dir",
    "find_idx_files",
    "load_dataset",
    "load_digits",
    "load_idx_dataset",
    "make_benchmark",
    "prepare_torchvision_root",
    "read_idx",
    "stream_length",
    "write_idx",
]

__getattr__, __dir__ = lazy_exports(globals(), {
    **dict.fromkeys(('DATASETS', 'PROTOCOLS', 'SCENARIOS'), 'lightning_ssr.data.names'),
    **dict.fromkeys(('ContinualBenchmark', 'load_dataset', 'make_benchmark', 'stream_length'), 'lightning_ssr.data.benchmarks'),
    **dict.fromkeys(('load_digits',), 'lightning_ssr.data.digits'),
    **dict.fromkeys(('IDX_DATASETS', 'IDX_FILES', 'DatasetNotFoundError', 'IdxDataset', 'default_cache_dir', 'find_idx_files', 'load_idx_dataset', 'prepare_torchvision_root', 'read_idx', 'write_idx'), 'lightning_ssr.data.idx'),
    **dict.fromkeys(('TensorSplit',), 'lightning_ssr.data.tensors'),
})
