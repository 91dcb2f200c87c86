"""Sparse training of a LLaMA model with the Hugging Face Trainer: sparsify the model, add one
callback, train as usual. Checkpoints resume exactly (masks, step counter and random generator are
in the model's state_dict; the callback adds the update history), and each log gains
sparsify/density, sparsify/anp and sparsify/updates.

    pip install transformers accelerate
    python examples/hf_trainer.py                     # a tiny random-weight model on random tokens
    python examples/hf_trainer.py --resume            # continue from the last checkpoint in runs/hf

Swap the config and the dataset for your own; the policy is a dict here, a YAML path works too.
"""
import argparse

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import sparsify
from sparsify.integrations.hf import install

POLICY = {
    "version": 1,
    "seed": 0,
    "rules": [{
        "name": "attention and MLP",
        "match": {"regex": r".*\.(q|k|v|o|gate|up|down)_proj"},
        "density": 0.3,
        "method": "CHTs",
        "update": {"every": 5, "unit": "steps"},  # a topology update every 5 optimizer steps
    }],
}


class RandomTokens(torch.utils.data.Dataset):
    """Stands for a tokenized corpus: dicts of input_ids and labels (the model shifts the labels)."""

    def __init__(self, n, seq, vocab):
        self.ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", default="runs/hf")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--resume", action="store_true", help="resume from the last checkpoint in --output-dir")
    options = parser.parse_args()

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    model, handle = sparsify.sparsify(model, POLICY, example_inputs=(torch.randint(0, 256, (2, 32)),))
    print(handle.summary())

    args = TrainingArguments(output_dir=options.output_dir, max_steps=options.steps, per_device_train_batch_size=8,
                             gradient_accumulation_steps=2, learning_rate=3e-3, logging_steps=5, save_steps=10,
                             report_to=[], use_cpu=not torch.cuda.is_available())
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(512, 32, 256))
    install(trainer, handle)  # the SparsifyCallback, placed before the reporters so they log its values
    trainer.train(resume_from_checkpoint=True if options.resume else None)

    last = handle.history[-1]
    print(f"{len(handle.history)} topology updates; the last at step {last['step']}, ANP {last['anp']:.3f}")
    trainer.save_model(f"{options.output_dir}/final")  # the sparse model; masks included


if __name__ == "__main__":
    main()
