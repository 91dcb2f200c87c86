"""Hugging Face GPTNeoXForCausalLM (Pythia's architecture) from a small config (no download): one
fused query_key_value projection with heads interleaved, rotary embedding on a quarter of each
head, attention and MLP in parallel off the same residual, GELU MLP. Built as Hugging Face builds
it by default, with the key/value cache on."""
import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM


def build_model():
    torch.manual_seed(0)
    config = GPTNeoXConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, rotary_pct=0.25, use_parallel_residual=True, attn_implementation="sdpa",
    )
    return GPTNeoXForCausalLM(config).eval()


def example_inputs():
    return {"input_ids": torch.randint(0, 128, (2, 8))}
