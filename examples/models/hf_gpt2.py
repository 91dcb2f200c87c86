"""Hugging Face GPT2LMHeadModel from a small config (no download). Its projections are
transformers Conv1D layers (weight stored [in, out]), which sparsify swaps for nn.Linear; one
fused c_attn projection for q, k and v; the output head tied to the token embedding. Built as
Hugging Face builds it by default, with the key/value cache on."""
import torch
from transformers import GPT2Config, GPT2LMHeadModel


def build_model():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                        eos_token_id=0, attn_implementation="sdpa")
    return GPT2LMHeadModel(config).eval()


def example_inputs():
    return {"input_ids": torch.randint(0, 128, (2, 8))}
