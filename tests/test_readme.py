"""Every Python block of the README runs as written (a snippet that does not run fails CI), and every
link between the README and the measurement record (``benchmarks/RESULTS.md``) reaches a heading.

Each block is written to a file and run in a fresh process in a temporary directory, with W&B
offline. The quick start's placeholders (``model``, ``datamodule``, ``datamodule_2``: "your own
LightningModule") are defined by a prelude: a tiny classifier and two small tasks.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

DOCS = ("README.md", "benchmarks/RESULTS.md")
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)

_PLACEHOLDERS = '''
import lightning as L, torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class _Model(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), 1e-3)


class _Task(L.LightningDataModule):
    def __init__(self, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.data = TensorDataset(torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g))

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=16)


model, datamodule, datamodule_2 = _Model(), _Task(0), _Task(1)
'''


def test_the_readme_has_python_blocks() -> None:
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_python_block_runs(index: int, tmp_path: Path) -> None:
    block = BLOCKS[index]
    if "avalanche" in block:
        pytest.importorskip("avalanche")
    if "torchvision" in block:
        pytest.importorskip("torchvision")
    prelude = _PLACEHOLDERS if re.search(r"\bdatamodule\b", block) else ""
    script = tmp_path / f"readme_block_{index}.py"
    script.write_text(prelude + "\n" + block)
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, f"README block {index}:\n{block}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"


def _anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, ``-1``... for repeats."""
    seen: collections.Counter[str] = collections.Counter()
    out, fenced = set(), False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        heading = None if fenced else re.match(r"^#{1,6}\s+(.*)$", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            out.add(slug if not seen[slug] else f"{slug}-{seen[slug]}")
            seen[slug] += 1
    return out


def test_the_anchor_rule_follows_github() -> None:
    text = "# A `code` & B: c (d=0.6)\n## Tasks\n## Tasks\n```\n# not a heading\n```\n"
    assert _anchors(text) == {"a-code--b-c-d06", "tasks", "tasks-1"}


@pytest.mark.parametrize("doc", DOCS)
def test_every_link_between_the_docs_reaches_a_heading(doc: str) -> None:
    anchors = {name: _anchors((ROOT / name).read_text()) for name in DOCS}
    here = ROOT / doc
    links = re.findall(r"\]\(([^)\s#]*)(?:#([^)\s]+))?\)", here.read_text())
    assert links
    broken = []
    for target, anchor in links:
        if re.match(r"[a-z]+:", target):
            continue  # an address on the web
        path = (here.parent / target).resolve() if target else here
        if not path.exists():
            broken.append(f"{target} (no such file)")
            continue
        name = path.relative_to(ROOT.resolve()).as_posix() if path.is_relative_to(ROOT.resolve()) else str(path)
        if anchor and anchor not in anchors.get(name, {anchor}):
            broken.append(f"{target}#{anchor}")
    assert not broken, f"{doc}: links that reach no heading or file: {broken}"
