"""Hugging Face Phi3ForCausalLM from a small config (no download): q, k and v from one fused layer
(qkv_proj) with grouped-query attention (4 q heads, 2 kv heads) and rotary embedding, and gate and
up from one fused layer (gate_up_proj, split with chunk(2) into up * silu(gate)) feeding down_proj."""
import torch
from transformers import Phi3Config, Phi3ForCausalLM


def build_model():
    torch.manual_seed(0)
    config = Phi3Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=0, eos_token_id=0,
        attn_implementation="sdpa",
    )
    return Phi3ForCausalLM(config).eval()


def example_inputs():
    return {"input_ids": torch.randint(0, 128, (2, 8))}
