"""Hugging Face DeepseekV3ForCausalLM from a small config (no download): multi-head latent attention
(q through a low-rank q_a_proj -> norm -> q_b_proj; keys and values through kv_a_proj_with_mqa ->
norm -> kv_b_proj, each head's key its own k_nope beside one rotary part every head shares, copied
into the halves of an empty tensor; q heads of 16 rows, v heads of 12), then a dense MLP in the
first layer and a mixture of experts with a shared expert in the second."""
import torch
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM


def build_model():
    torch.manual_seed(0)
    config = DeepseekV3Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=12, max_position_embeddings=64, pad_token_id=0, bos_token_id=0,
        eos_token_id=0, attn_implementation="sdpa",
    )
    return DeepseekV3ForCausalLM(config).eval()


def example_inputs():
    return {"input_ids": torch.randint(0, 128, (2, 8))}
