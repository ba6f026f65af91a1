"""Shared tiny models, data and settings for the test suite (CPU, offline, seconds per test)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent


def run_script(*argv: str) -> str:
    """Run ``python *argv`` from the repository root, as a user would; its stdout (the output tails on failure)."""
    out = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout


FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
needs_fmnist = pytest.mark.skipif(
    not os.path.isdir(FMNIST_DIR), reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)"
)


def _mnist_in_cache() -> bool:
    from lightning_ssr.data.idx import IDX_FILES, default_cache_dir

    raw = default_cache_dir() / "MNIST" / "raw"
    return all((raw / name).is_file() for name in IDX_FILES.values())


needs_mnist = pytest.mark.skipif(
    not _mnist_in_cache(), reason="MNIST not in the cache (run `tools/get-mnist ~/.cache/lightning_ssr`, as .ci/run does)"
)


def tiny_mlp(n_in: int = 8, hidden: int = 16, n_out: int = 3) -> nn.Sequential:
    """A two-hidden-layer MLP with module activations."""
    return nn.Sequential(nn.Linear(n_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, n_out))


class FunctionalMLP(nn.Module):
    """The same MLP with functional activations (no ReLU modules)."""

    def __init__(self, n_in: int = 8, hidden: int = 16, n_out: int = 3) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(n_in, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def tiny_cnn(n_out: int = 3) -> nn.Sequential:
    """A small CNN on 1x8x8 inputs."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 8 * 8, n_out),
    )


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
