"""Hugging Face BertForSequenceClassification from a small config (no download): a bidirectional
encoder with biased query/key/value projections, post-norm residuals, GELU MLP, a tanh pooler and
a classifier head; inputs with an attention mask."""
import torch
from transformers import BertConfig, BertForSequenceClassification


def build_model():
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        max_position_embeddings=64, num_labels=3, attn_implementation="sdpa",
    )
    return BertForSequenceClassification(config).eval()


def example_inputs():
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0
    return {"input_ids": torch.randint(0, 128, (2, 8)), "attention_mask": mask}
