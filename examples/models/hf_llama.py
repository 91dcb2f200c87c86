"""Hugging Face LlamaForCausalLM built from a small LlamaConfig (no download)."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def build_model():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=False, use_cache=False, attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config).eval()


def example_inputs():
    return {"input_ids": torch.randint(0, 128, (2, 8))}
