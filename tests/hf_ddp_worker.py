"""One process of a 2-process Hugging Face Trainer run under torchrun (its DDP launch, gloo on CPU):
records every rank's mask checksums after every topology update, its losses and its final masks."""
import gc
import json
import sys

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

import sparsify
from sparsify.integrations.hf import SparsifyCallback
from ddp_worker import checksum, every_ranks_checksums

VOCAB, SEQ = 64, 16


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=64):
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(1))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Losses(TrainerCallback):
    def __init__(self):
        self.losses = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


def main(out: str, method: str) -> None:
    torch.set_num_threads(1)
    policy = {"version": 1, "seed": 0, "rules": [{
        "match": {"regex": r".*\.(q|k|v|o|gate|up|down)_proj"}, "density": 0.3, "method": method,
        "update": {"every": 3, "unit": "steps"}}]}
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ)
    model, handle = sparsify.sparsify(LlamaForCausalLM(config), policy, example_inputs=(torch.randint(0, VOCAB, (2, SEQ)),))
    sums = []

    def compare(record):
        sums.append(every_ranks_checksums(handle))

    handle.evolution.listeners.append(compare)
    losses = Losses()
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             num_train_epochs=3, learning_rate=1e-2, use_cpu=True, ddp_backend="gloo",
                             report_to=[], logging_steps=1, save_strategy="no", seed=0, data_seed=0,
                             disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[SparsifyCallback(handle), losses])
    trainer.train()  # 64 samples, 32 a rank, 4 a batch, 2 accumulated: 4 optimizer steps an epoch, 12 in all
    rank = dist.get_rank()
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"world": dist.get_world_size(), "wrapped": type(trainer.model_wrapped).__name__,
                   "steps": trainer.state.global_step, "counted": handle.evolution.step_index,
                   "updates": [r["step"] for r in handle.history], "sums": sums, "losses": losses.losses,
                   "final": checksum(handle.masks())}, f)
    del trainer, model
    gc.collect()  # DDP's reducer holds gloo work: gone before the teardown
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
