"""Offline data: digits, IDX files in torchvision's layout, and the continual benchmarks."""

from __future__ import annotations

import gzip
import os
import time
from pathlib import Path

import pytest
import torch
from conftest import FMNIST_DIR, needs_fmnist, needs_mnist

from lightning_ssr.data import (
    IDX_FILES,
    DatasetNotFoundError,
    find_idx_files,
    load_dataset,
    load_digits,
    load_idx_dataset,
    make_benchmark,
    prepare_torchvision_root,
    read_idx,
    write_idx,
)

# ----------------------------------------------------------------------------- helpers


def _synthetic_idx(directory: Path, n_train: int = 60, n_test: int = 20, size: int = 28,
                   compress: dict[str, bool] | None = None) -> dict[str, torch.Tensor]:
    """Write the four MNIST files (every class present) and return what was written."""
    directory.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    tensors = {
        "train_images": torch.randint(0, 256, (n_train, size, size), dtype=torch.uint8, generator=g),
        "train_labels": (torch.arange(n_train) % 10).to(torch.uint8),
        "test_images": torch.randint(0, 256, (n_test, size, size), dtype=torch.uint8, generator=g),
        "test_labels": (torch.arange(n_test) % 10).to(torch.uint8),
    }
    compress = compress or {}
    for role, t in tensors.items():
        gz = compress.get(role, True)
        write_idx(directory / (IDX_FILES[role] + (".gz" if gz else "")), t)
    return tensors


def _targets(exp) -> list[int]:  # noqa: ANN001 - an Avalanche experience
    return [int(v) for v in exp.dataset.targets]


# ------------------------------------------------------------------------------ digits


def test_digits_shapes_range_and_stratified_split() -> None:
    data = load_digits()
    assert data.train_x.shape == (1347, 1, 8, 8) and data.test_x.shape == (450, 1, 8, 8)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    assert float(data.train_x.min()) == 0.0 and float(data.train_x.max()) == 1.0
    counts_train = torch.bincount(data.train_y, minlength=10)
    counts_test = torch.bincount(data.test_y, minlength=10)
    share = counts_test.float() / (counts_train + counts_test).float()
    assert torch.all((share - 0.25).abs() < 0.02), share  # every class split 75 / 25
    again = load_digits()
    torch.testing.assert_close(again.test_x, data.test_x)  # a fixed split
    other = load_digits(seed=1)
    assert not torch.equal(other.test_y, data.test_y)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"test_fraction": 0.0}, ValueError, r"`test_fraction` must be in \(0, 1\), got 0.0"),
        ({"test_fraction": "a"}, TypeError, r"`test_fraction` must be a float"),
        ({"seed": -1}, ValueError, r"`seed` must be in \[0, 2\*\*32\), got -1"),
        ({"seed": 1.5}, TypeError, r"`seed` must be an int, got 1.5"),
    ],
)
def test_digits_rejects_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        load_digits(**kwargs)


# --------------------------------------------------------------------------- benchmarks


@pytest.mark.parametrize("scenario", ["task", "domain", "class"])
def test_split_scenarios(scenario: str) -> None:
    bench = make_benchmark("digits", "split", scenario)
    assert bench.n_tasks == 5 and len(bench.train_stream) == 5 and len(bench.test_stream) == 5
    assert bench.input_shape == (1, 8, 8) and bench.input_size == 64
    assert bench.classes_per_experience == ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))
    assert bench.n_classes == (10 if scenario == "class" else 2)
    assert bench.multi_head == (scenario == "task")
    for t, (tr, te) in enumerate(zip(bench.train_stream, bench.test_stream)):
        for exp in (tr, te):
            expected_task = t if scenario == "task" else 0
            assert exp.task_label == expected_task
            assert set(exp.dataset.targets_task_labels) == {expected_task}
            expected = {2 * t, 2 * t + 1} if scenario == "class" else {0, 1}
            assert set(_targets(exp)) == expected
            assert sorted(exp.classes_in_this_experience) == sorted(expected)
    sizes = [len(e.dataset) for e in bench.train_stream] + [len(e.dataset) for e in bench.test_stream]
    assert sum(sizes) == 1797


@pytest.mark.parametrize("scenario", ["task", "domain", "class"])
def test_permuted_scenarios(scenario: str) -> None:
    bench = make_benchmark("digits", "permuted", scenario, n_tasks=4)
    assert len(bench.train_stream) == 4 and bench.permutations is not None
    assert bench.n_classes == (40 if scenario == "class" else 10)
    base = load_digits()
    for t, exp in enumerate(bench.train_stream):
        assert exp.task_label == (t if scenario == "task" else 0)
        offset = 10 * t if scenario == "class" else 0
        assert set(_targets(exp)) == set(range(offset, offset + 10))
        assert len(exp.dataset) == len(base.train_y)
        x, y, task = exp.dataset[5]
        perm = bench.permutations[t]
        torch.testing.assert_close(x.flatten(), base.train_x[5].flatten()[perm])
        assert y == int(base.train_y[5]) + offset and task == exp.task_label
    torch.testing.assert_close(bench.permutations[0], torch.arange(64))  # task 0 unpermuted
    assert all(not torch.equal(p, bench.permutations[0]) for p in bench.permutations[1:])


def test_permuted_defaults_and_seeds() -> None:
    bench = make_benchmark("digits", "permuted", "domain", train_subset=20, test_subset=10)
    assert bench.n_tasks == 10
    again = make_benchmark("digits", "permuted", "domain", train_subset=20, test_subset=10)
    other = make_benchmark("digits", "permuted", "domain", seed=1, train_subset=20, test_subset=10)
    assert all(torch.equal(a, b) for a, b in zip(bench.permutations, again.permutations))
    assert not torch.equal(bench.permutations[1], other.permutations[1])


def test_subsets_are_balanced_and_seeded() -> None:
    bench = make_benchmark("digits", "split", "class", train_subset=40, test_subset=11)
    for exp in bench.train_stream:
        counts = torch.bincount(torch.tensor(_targets(exp)))
        assert len(exp.dataset) == 40 and sorted(counts[counts > 0].tolist()) == [20, 20]
    assert [len(e.dataset) for e in bench.test_stream] == [11] * 5
    big = make_benchmark("digits", "split", "domain", train_subset=10_000)
    assert sum(len(e.dataset) for e in big.train_stream) == 1347  # capped at what exists


def test_class_order_and_two_task_split() -> None:
    order = [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    bench = make_benchmark("digits", "split", "class", class_order=order)
    assert bench.classes_per_experience[0] == (9, 8)
    assert set(_targets(bench.train_stream[0])) == {8, 9}
    domain = make_benchmark("digits", "split", "domain", class_order=order)
    first = domain.train_stream[0]
    labels = torch.tensor(_targets(first))
    # position in the pair: class 9 (first of the pair) -> 0, class 8 -> 1
    assert set(labels.tolist()) == {0, 1}
    two = make_benchmark("digits", "split", "task", n_tasks=2)
    assert two.n_classes == 5 and set(_targets(two.train_stream[1])) == set(range(5))


def test_minibatches_have_inputs_targets_and_task_labels() -> None:
    bench = make_benchmark("digits", "split", "task", train_subset=16)
    loader = torch.utils.data.DataLoader(bench.train_stream[2].dataset, batch_size=8)
    x, y, t = next(iter(loader))
    assert x.shape == (8, 1, 8, 8) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and set(y.tolist()) <= {0, 1}
    assert t.tolist() == [2] * 8


def test_digits_benchmark_is_fast() -> None:
    make_benchmark("digits", "split", "domain")  # warm imports
    start = time.perf_counter()
    make_benchmark("digits", "split", "task")
    make_benchmark("digits", "permuted", "domain")
    assert time.perf_counter() - start < 3.0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"dataset": "cifar10"}, ValueError, r"`dataset` must be one of \['digits', 'fmnist', 'mnist'\], got 'cifar10'"),
        ({"protocol": "rotated"}, ValueError, r"`protocol` must be one of \['split', 'permuted'\], got 'rotated'"),
        ({"scenario": "joint"}, ValueError, r"`scenario` must be one of \['task', 'domain', 'class'\], got 'joint'"),
        ({"n_tasks": 3}, ValueError, r"`n_tasks` must be one of \[2, 5\] for protocol='split'.*got 3"),
        ({"n_tasks": 2.0}, TypeError, r"`n_tasks` must be an int, got 2.0"),
        ({"protocol": "permuted", "n_tasks": 0}, ValueError, r"`n_tasks` must be in \[1, 100\], got 0"),
        ({"seed": -3}, ValueError, r"`seed` must be in \[0, .*\], got -3"),
        ({"train_subset": 0}, ValueError, r"`train_subset` must be >= 1, got 0"),
        ({"test_subset": "10"}, TypeError, r"`test_subset` must be an int or None, got '10'"),
        ({"protocol": "permuted", "class_order": [0, 1]}, ValueError, r"`class_order` applies to protocol='split'"),
        ({"class_order": [0, 1, 2]}, ValueError, r"`class_order` must be a permutation of 0..9, got \[0, 1, 2\]"),
    ],
)
def test_make_benchmark_rejects_bad_arguments(kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        make_benchmark(**kwargs)


# ---------------------------------------------------------------------------- IDX files


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.float32, torch.float64])
@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_idx_round_trip(tmp_path: Path, dtype: torch.dtype, suffix: str) -> None:
    t = (torch.arange(24) - 5).reshape(2, 3, 4).to(dtype) if dtype != torch.uint8 else torch.arange(24, dtype=dtype)
    path = tmp_path / f"x-idx{suffix}"
    write_idx(path, t)
    with open(path, "rb") as f:
        assert (f.read(2) == b"\x1f\x8b") == (suffix == ".gz")
    back = read_idx(path)
    assert back.dtype == dtype
    torch.testing.assert_close(back, t)


def test_read_idx_rejects_malformed_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="is not an IDX file: its header is 01020304"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big") + b"\x00" * 3)
    with pytest.raises(ValueError, match=r"truncated or corrupt: its header says shape \(10,\)"):
        read_idx(short)
    with pytest.raises(DatasetNotFoundError, match="does not exist"):
        read_idx(tmp_path / "nothing")


def test_mnist_from_mixed_gz_and_raw_files_into_torchvision_layout(tmp_path: Path) -> None:
    src, cache = tmp_path / "src", tmp_path / "cache"
    written = _synthetic_idx(src, compress={"train_images": True, "train_labels": False,
                                            "test_images": False, "test_labels": True})
    data = load_idx_dataset("mnist", data_dir=src, cache_dir=cache)
    assert data.train_x.shape == (60, 1, 28, 28) and data.test_x.shape == (20, 1, 28, 28)
    torch.testing.assert_close(data.train_x[:, 0], written["train_images"].float() / 255)
    assert data.train_y.tolist() == written["train_labels"].long().tolist()
    raw = cache / "MNIST" / "raw"
    for name in IDX_FILES.values():
        assert (raw / name).read_bytes()[:2] == b"\x00\x00"  # uncompressed, as torchvision wants
    torchvision = pytest.importorskip("torchvision")
    tv = torchvision.datasets.MNIST(str(cache), train=True, download=False)
    assert torch.equal(tv.data, written["train_images"]) and tv.targets.tolist() == data.train_y.tolist()

    # a second call reuses the prepared files; changed sources are prepared again
    stamp = (raw / IDX_FILES["train_images"]).stat().st_mtime_ns
    prepare_torchvision_root("mnist", src, cache)
    assert (raw / IDX_FILES["train_images"]).stat().st_mtime_ns == stamp
    os.remove(src / (IDX_FILES["test_labels"] + ".gz"))
    write_idx(src / IDX_FILES["test_labels"], torch.full((20,), 3, dtype=torch.uint8))
    assert load_idx_dataset("mnist", data_dir=src, cache_dir=cache).test_y.tolist() == [3] * 20


def test_idx_files_found_in_a_torchvision_root(tmp_path: Path) -> None:
    _synthetic_idx(tmp_path / "tv" / "MNIST" / "raw", compress=dict.fromkeys(IDX_FILES, False))
    found = find_idx_files(tmp_path / "tv", "mnist")
    assert sorted(found) == sorted(IDX_FILES)
    assert prepare_torchvision_root("mnist", tmp_path / "tv", tmp_path / "tv") == tmp_path / "tv"


def test_mnist_benchmark_from_local_files(tmp_path: Path) -> None:
    _synthetic_idx(tmp_path / "src")
    bench = make_benchmark("mnist", "split", "class", data_dir=tmp_path / "src", cache_dir=tmp_path / "cache")
    assert bench.input_shape == (1, 28, 28) and bench.n_classes == 10
    assert [len(e.dataset) for e in bench.train_stream] == [12] * 5


def test_missing_directory_names_the_path_and_how_to_get_the_data(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as err:
        load_idx_dataset("fmnist", data_dir=missing, cache_dir=tmp_path / "cache")
    message = str(err.value)
    assert str(missing) in message and "apt-get install dataset-fashion-mnist" in message
    assert "download=True" in message and "--download" in message
    with pytest.raises(DatasetNotFoundError) as err:
        make_benchmark("mnist", data_dir=missing, cache_dir=tmp_path / "cache")
    message = str(err.value)  # the folder, the files looked for and both remedies
    assert str(missing) in message and "train-images-idx3-ubyte" in message and "train-images.idx3-ubyte" in message
    assert "tools/get-mnist DIR" in message and "--download" in message


def test_missing_file_is_named(tmp_path: Path) -> None:
    _synthetic_idx(tmp_path / "src")
    os.remove(tmp_path / "src" / (IDX_FILES["test_images"] + ".gz"))
    with pytest.raises(DatasetNotFoundError) as err:
        load_idx_dataset("mnist", data_dir=tmp_path / "src", cache_dir=tmp_path / "cache")
    message = str(err.value)
    assert "t10k-images-idx3-ubyte / t10k-images-idx3-ubyte.gz / t10k-images.idx3-ubyte[.gz]" in message
    assert "train-images" not in message.split("(looked in")[1].split(")")[0]  # only the missing one
    assert str(tmp_path / "src" / "MNIST" / "raw") in message and "tools/get-mnist DIR" in message


@pytest.mark.parametrize("compress", [False, True])
def test_idx_files_with_dotted_names_as_some_copies_have_them(tmp_path: Path, compress: bool) -> None:
    written = _synthetic_idx(tmp_path / "plain", compress=dict.fromkeys(IDX_FILES, compress))
    dotted = tmp_path / "dotted"
    dotted.mkdir()
    for path in (tmp_path / "plain").iterdir():
        (dotted / path.name.replace("-idx", ".idx", 1)).write_bytes(path.read_bytes())
    assert (dotted / ("train-images.idx3-ubyte" + (".gz" if compress else ""))).is_file()
    data = load_idx_dataset("mnist", data_dir=dotted, cache_dir=tmp_path / "cache")
    assert data.train_y.tolist() == written["train_labels"].long().tolist()


def test_padding_enlarges_the_images_and_the_permutations(tmp_path: Path) -> None:
    _synthetic_idx(tmp_path / "src")
    bench = make_benchmark("mnist", "permuted", "domain", n_tasks=3, data_dir=tmp_path / "src",
                           cache_dir=tmp_path / "cache", pad=2)
    assert bench.input_shape == (1, 32, 32) and bench.input_size == 1024
    assert sorted(bench.permutations[2].tolist()) == list(range(1024))
    x, _, _ = bench.train_stream[0].dataset[0]
    assert x.shape == (1, 32, 32) and float(x[:, :2].abs().sum()) == 0.0
    with pytest.raises(ValueError, match=r"`pad` must be"):
        make_benchmark("digits", pad=-1)


@needs_mnist
def test_genuine_mnist_from_the_cache_that_get_mnist_fills() -> None:
    data = load_dataset("mnist")
    assert data.train_x.shape == (60000, 1, 28, 28) and data.test_x.shape == (10000, 1, 28, 28)
    assert torch.bincount(data.test_y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    bench = make_benchmark("mnist", "split", "task")
    assert [len(e.dataset) for e in bench.train_stream] == [12665, 12089, 11263, 12183, 11800]


def test_corrupt_gzip_is_reported(tmp_path: Path) -> None:
    _synthetic_idx(tmp_path / "src")
    (tmp_path / "src" / (IDX_FILES["train_labels"] + ".gz")).write_bytes(gzip.compress(b"\x00\x00\x08\x01")[:12])
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte\.gz' could not be read"):
        load_idx_dataset("mnist", data_dir=tmp_path / "src", cache_dir=tmp_path / "cache")


@needs_fmnist
def test_fashion_mnist_from_the_system_package(tmp_path: Path) -> None:
    data = load_idx_dataset("fmnist", data_dir=FMNIST_DIR, cache_dir=tmp_path)
    assert data.train_x.shape == (60000, 1, 28, 28) and data.test_x.shape == (10000, 1, 28, 28)
    assert set(data.test_y.unique().tolist()) == set(range(10))
    assert 0.0 <= float(data.test_x.min()) and float(data.test_x.max()) <= 1.0
    torchvision = pytest.importorskip("torchvision")
    tv = torchvision.datasets.FashionMNIST(str(tmp_path), train=False, download=False)
    assert len(tv) == 10000 and tv.targets.tolist() == data.test_y.tolist()
    bench = make_benchmark("fmnist", "split", "domain", train_subset=100, test_subset=50, cache_dir=tmp_path)
    assert [len(e.dataset) for e in bench.train_stream] == [100] * 5
    assert bench.input_shape == (1, 28, 28) and bench.n_classes == 2
