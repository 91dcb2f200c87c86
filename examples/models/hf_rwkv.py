"""Hugging Face RwkvForCausalLM from a small config (no download): no attention; each block's time
mixing is a receptance-gated key-value recurrence computed step by step over time, channel by
channel (sigmoid(r) times a weighted average of v with weights exp(k), decayed by a per-channel
time_decay, the current step boosted by time_first), and its channel mixing is
sigmoid(receptance) * value(relu(key)^2). The capture unrolls the loop over time for the example's
length."""
import torch
from transformers import RwkvConfig, RwkvForCausalLM


def build_model():
    torch.manual_seed(0)
    config = RwkvConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, attention_hidden_size=32,
                        intermediate_size=64, context_length=64, use_cache=False)
    return RwkvForCausalLM(config).eval()


def example_inputs():
    return {"input_ids": torch.randint(0, 128, (2, 8))}
