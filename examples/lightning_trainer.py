"""Sparse training with Lightning: sparsify the model, add one callback, train as usual.
Checkpoints resume exactly (masks, step counter and random generator are in the module's
state_dict; the callback's checkpoint entry adds the update history), and every training step logs
sparsify/density, sparsify/updates and, after the first update, sparsify/anp and sparsify/regrown.

    pip install lightning
    python examples/lightning_trainer.py                  # an MLP at 10% density on a synthetic task
    python examples/lightning_trainer.py --resume         # continue from the last checkpoint in runs/lightning
    python examples/lightning_trainer.py --devices 2      # the ddp strategy in 2 processes (gloo on CPU)

Swap the network and the data for your own; the policy is a dict here, a YAML path works too.
"""
import argparse

import lightning
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

import sparsify
from sparsify.integrations.lightning import SparsifyCallback

POLICY = {
    "version": 1,
    "seed": 0,
    "rules": [{
        "name": "hidden layers",
        "match": {"regex": r"fc[12]"},
        "density": 0.1,
        "method": "CHTs",
        "update": {"every": 20, "unit": "steps"},  # a topology update every 20 optimizer steps
    }],
}


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 512), nn.Linear(512, 512), nn.Linear(512, 10)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class Classifier(lightning.LightningModule):
    """Any LightningModule whose network (or which itself) was sparsified."""

    def __init__(self, net: nn.Module, lr: float):
        super().__init__()
        self.net, self.lr = net, lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_accuracy", (self.net(x).argmax(-1) == y).float().mean(), prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=5e-4)


def synthetic(n: int, seed: int) -> torch.utils.data.TensorDataset:
    """Stands for a real data set: 10 classes that a random teacher network assigns to 64 features."""
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(64, 10, generator=g)
    x = torch.randn(n, 64, generator=torch.Generator().manual_seed(seed))
    return torch.utils.data.TensorDataset(x, (x @ teacher).argmax(1))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/lightning")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --output-dir")
    options = parser.parse_args()

    torch.manual_seed(0)
    net, handle = sparsify.sparsify(MLP(), POLICY, example_inputs=torch.randn(2, 64))
    print(handle.summary())

    train = torch.utils.data.DataLoader(synthetic(8192, 1), batch_size=64, shuffle=True)
    val = torch.utils.data.DataLoader(synthetic(2048, 2), batch_size=256)
    trainer = lightning.Trainer(
        max_epochs=options.epochs, accelerator="cpu", devices=options.devices,
        strategy="ddp" if options.devices > 1 else "auto", accumulate_grad_batches=2,
        default_root_dir=options.output_dir, logger=CSVLogger(options.output_dir, name="logs"),
        callbacks=[SparsifyCallback(handle, prog_bar=True), ModelCheckpoint(options.output_dir, save_last=True)])
    trainer.fit(Classifier(net, lr=3e-3), train, val, ckpt_path="last" if options.resume else None)

    if trainer.is_global_zero and handle.history:
        last = handle.history[-1]
        print(f"{len(handle.history)} topology updates; the last at step {last['step']}, ANP {last['anp']:.3f}; "
              f"logs in {trainer.logger.log_dir}/metrics.csv")


if __name__ == "__main__":
    main()
