"""The model and data of the Lightning tests, and (run as a script under torchrun) one process of a
2-process ``ddp`` run that records every rank's mask checksums after every topology update."""
import gc
import json
import sys

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from torch import nn

import sparsify
from sparsify.integrations.lightning import SparsifyCallback
from ddp_worker import checksum, every_ranks_checksums

POLICY = {"version": 1, "seed": 0, "rules": [{"match": {"regex": "fc[12]"}, "density": 0.2, "method": "CHTs",
                                              "update": {"every": 3, "unit": "steps"}}]}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 4)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class Classifier(LightningModule):
    def __init__(self, net):
        super().__init__()
        self.net = net
        self.losses = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def data(n=64, batch_size=8):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 16, generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, x[:, :4].argmax(1)), batch_size=batch_size)


def build(seed=0, policy=None):
    torch.manual_seed(seed)
    net, handle = sparsify.sparsify(Net(), policy or POLICY, example_inputs=torch.randn(2, 16))
    return Classifier(net), handle


def ddp(out: str, method: str) -> None:
    torch.set_num_threads(1)
    policy = {**POLICY, "rules": [{**POLICY["rules"][0], "method": method}]}
    module, handle = build(policy=policy)
    sums = []

    def compare(record):
        sums.append(every_ranks_checksums(handle))

    handle.evolution.listeners.append(compare)
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=3, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      callbacks=[SparsifyCallback(handle)])
    trainer.fit(module, data(128))  # 16 batches, 8 per rank: 24 optimizer steps, updates at 3, 6, ..., 15
    rank = dist.get_rank()
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"steps": trainer.global_step, "updates": [r["step"] for r in handle.history], "sums": sums,
                   "losses": len(module.losses), "final": checksum(handle.masks())}, f)
    del trainer, module
    gc.collect()  # DDP's reducer holds gloo work: gone before the teardown
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    ddp(sys.argv[1], sys.argv[2])
