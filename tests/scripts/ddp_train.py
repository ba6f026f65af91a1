"""Train a tiny model with SynapticScaling under Lightning DDP on 2 CPU processes (gloo).

Each rank writes its parameters, its SSR state and the activity it sensed locally to
``OUT/rank<r>.pt`` so a test can compare the replicas. Run as a script: Lightning's ``ddp``
strategy relaunches this same command for rank 1.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ssr import SynapticScaling


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, sync_dist=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--wandb", action="store_true")
    parser.add_argument("--output-targets", action="store_true",
                        help="SSR with output_targets, and a second (class-incremental) task trained toward class 2")
    parser.add_argument("--subspace", action="store_true", help="with --output-targets: also subspace_energy=0.9")
    args = parser.parse_args()
    out = Path(args.out)
    L.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    # 232 samples: 116 a rank, so each epoch ends on a partial batch of 4 (scale_partial_batches)
    x, y = torch.randn(232, 8, generator=g), torch.randint(0, 3, (232,), generator=g)
    x[128:] *= 3.0  # the second half (rank 1's shard, unshuffled) is more active
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    model = Classifier()
    local: dict[str, torch.Tensor] = {}
    overlap: dict[str, float] = {}
    model.net[0].register_forward_hook(lambda m, i, o: local.__setitem__("a", torch.relu(o.detach()).mean(0)))
    cb = SynapticScaling(scaling_rate=0.5, set_point="layer_mean", warmup_steps=1, consolidation=1.0, update_every=2,
                         output_targets=args.output_targets, subspace_energy=0.9 if args.subspace else 0.0)
    if args.output_targets:
        y = y.clamp(max=1)  # task 1: classes 0 and 1
        loader = DataLoader(TensorDataset(x, y), batch_size=16)
    logger = False
    if args.wandb:
        from lightning.pytorch.loggers import WandbLogger

        logger = WandbLogger(project="lightning-ssr-test", save_dir=str(out), offline=True)
    trainer = L.Trainer(
        accelerator="cpu", strategy="ddp", devices=2, max_epochs=2, logger=logger, log_every_n_steps=2,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=True, callbacks=[cb],
    )
    trainer.fit(model, loader)
    if args.output_targets:  # task 2: class 2 only; the output gates then follow its targets
        watch = L.Callback()  # the pull's factors during task 2 (consolidation clears them at its end)
        watch.on_train_batch_end = lambda *a: overlap.update(cb.engine.overlap)
        trainer = L.Trainer(accelerator="cpu", strategy="ddp", devices=2, max_epochs=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            use_distributed_sampler=True, callbacks=[cb, watch])
        trainer.fit(model, DataLoader(TensorDataset(x, torch.full_like(y, 2)), batch_size=16))
    rank = trainer.global_rank
    torch.save(
        {"params": {k: v.detach().clone() for k, v in model.state_dict().items()},
         "ssr": cb.engine.state_dict(), "local_activity": local["a"], "overlap": overlap},
        out / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "offline")
    main()
