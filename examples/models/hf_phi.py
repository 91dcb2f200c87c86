"""Hugging Face PhiForCausalLM from a small config (no download): separate biased q/k/v projections
with rotary embedding on half of each head, attention and MLP in parallel off one layer norm,
a fc1 -> GELU (tanh form) -> fc2 MLP, a biased output head."""
import torch
from transformers import PhiConfig, PhiForCausalLM


def build_model():
    torch.manual_seed(0)
    config = PhiConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, partial_rotary_factor=0.5, attn_implementation="sdpa",
    )
    return PhiForCausalLM(config).eval()


def example_inputs():
    return {"input_ids": torch.randint(0, 128, (2, 8))}
