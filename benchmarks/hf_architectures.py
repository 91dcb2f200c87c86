"""Hugging Face architectures beyond the model zoo, each through the whole tool from a tiny config.

For each architecture (random weights, no download): the transform (every linear layer it owns at
density 0.5, CHTs, an update every 2 steps), 8 AdamW steps in training mode, a quarter of every MLP
chain's hidden units cut as training might, and in every attention the output columns of the first
grouped-query group's heads, then the export (shrink, ONNX, .pt2, save_pretrained) checked against
the trained model on held-out inputs of a batch and length the export never saw (--length sets it).
Then the csr backend against the masked one: the same architecture at density 0.04 with SET,
4 steps in eval mode (no dropout) on each backend, the largest relative difference of their
losses, once with AdamW and once with SGD (AdamW's first step on a regrown link moves it by about lr
whatever the size of its gradient, so rounding-level gradients of either sign move it as much).
Prints one row per architecture: what was found, the parameters kept, the parities, or the error
sparsify raised. Run from the repository root:

    python benchmarks/hf_architectures.py [--only gpt2,falcon] [--length 11]
"""
from __future__ import annotations

import argparse
import datetime
import tempfile
import time
import warnings
from pathlib import Path

import torch
import transformers as T

import sparsify
from sparsify.errors import SparsifyError
from sparsify.passes.couple import ChainGroup, DotGroup

POLICY = {"version": 1, "unmatched": "sparsify",
          "defaults": {"density": 0.5, "method": "CHTs", "update": {"every": 2, "unit": "steps"}}}
DECODER = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, attn_implementation="sdpa")
# multi-head latent attention: q heads of 16 rows (8 + 8 rotary), v heads of 12
LATENT = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
              v_head_dim=12, max_position_embeddings=64)
EXPERTS = dict(moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
               first_k_dense_replace=1)


def architectures():
    """name -> (build, inputs of a given batch and length)."""
    tokens = lambda b, t: {"input_ids": torch.randint(0, 128, (b, t))}  # noqa: E731
    return {
        "gpt2": (lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                                        bos_token_id=0, eos_token_id=0)), tokens),
        "qwen2": (lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**DECODER)), tokens),
        "mistral": (lambda: T.MistralForCausalLM(T.MistralConfig(**DECODER)), tokens),
        "gemma": (lambda: T.GemmaForCausalLM(T.GemmaConfig(**DECODER, head_dim=16)), tokens),
        "opt": (lambda: T.OPTForCausalLM(T.OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                                     num_attention_heads=4, max_position_embeddings=64,
                                                     word_embed_proj_dim=64)), tokens),
        "bloom": (lambda: T.BloomForCausalLM(T.BloomConfig(vocab_size=128, hidden_size=64, n_layer=2, n_head=4)), tokens),
        "falcon": (lambda: T.FalconForCausalLM(T.FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                                              num_attention_heads=4, new_decoder_architecture=False)),
                   tokens),
        "gptj": (lambda: T.GPTJForCausalLM(T.GPTJConfig(vocab_size=128, n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
                                                        n_positions=64)), tokens),
        "distilbert": (lambda: T.DistilBertForSequenceClassification(T.DistilBertConfig(
            vocab_size=128, dim=64, n_layers=2, n_heads=4, hidden_dim=128, max_position_embeddings=64)), tokens),
        "vit": (lambda: T.ViTForImageClassification(T.ViTConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
            patch_size=8, num_labels=10)), lambda b, t: {"pixel_values": torch.randn(b, 3, 32, 32)}),
        "t5": (lambda: T.T5ForConditionalGeneration(T.T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128,
                                                               num_layers=2, num_heads=4, decoder_start_token_id=0)),
               lambda b, t: {**tokens(b, t), "decoder_input_ids": torch.randint(0, 128, (b, t - 2))}),
        "mixtral": (lambda: T.MixtralForCausalLM(T.MixtralConfig(**DECODER, num_local_experts=4, num_experts_per_tok=2)),
                    tokens),
        "llama": (lambda: T.LlamaForCausalLM(T.LlamaConfig(**DECODER)), tokens),
        "phi3": (lambda: T.Phi3ForCausalLM(T.Phi3Config(**DECODER, pad_token_id=0, bos_token_id=0, eos_token_id=0)),
                 tokens),
        "qwen3": (lambda: T.Qwen3ForCausalLM(T.Qwen3Config(**DECODER, head_dim=16)), tokens),
        "gemma2": (lambda: T.Gemma2ForCausalLM(T.Gemma2Config(**{**DECODER, "attn_implementation": "eager"},
                                                              head_dim=16)), tokens),
        "gemma3": (lambda: T.Gemma3ForCausalLM(T.Gemma3TextConfig(**DECODER, head_dim=16)), tokens),
        "olmo2": (lambda: T.Olmo2ForCausalLM(T.Olmo2Config(**DECODER)), tokens),
        "cohere": (lambda: T.CohereForCausalLM(T.CohereConfig(**DECODER)), tokens),
        "granite": (lambda: T.GraniteForCausalLM(T.GraniteConfig(**DECODER)), tokens),
        "stablelm": (lambda: T.StableLmForCausalLM(T.StableLmConfig(**DECODER)), tokens),
        "starcoder2": (lambda: T.Starcoder2ForCausalLM(T.Starcoder2Config(**DECODER)), tokens),
        "phi": (lambda: T.PhiForCausalLM(T.PhiConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                                     num_hidden_layers=2, num_attention_heads=4,
                                                     max_position_embeddings=64)), tokens),
        "gpt_neox": (lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                                                  num_hidden_layers=2, num_attention_heads=4,
                                                                  max_position_embeddings=64)), tokens),
        "falcon_gqa": (lambda: T.FalconForCausalLM(T.FalconConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                                                  num_attention_heads=4, num_kv_heads=2,
                                                                  new_decoder_architecture=True)), tokens),
        "gpt_bigcode": (lambda: T.GPTBigCodeForCausalLM(T.GPTBigCodeConfig(vocab_size=128, n_embd=64, n_layer=2,
                                                                           n_head=4, n_positions=64,
                                                                           multi_query=True)), tokens),
        "codegen": (lambda: T.CodeGenForCausalLM(T.CodeGenConfig(vocab_size=128, n_embd=64, n_layer=2, n_head=4,
                                                                 rotary_dim=8, n_positions=64, n_ctx=64)), tokens),
        "bert": (lambda: T.BertForSequenceClassification(T.BertConfig(
            vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=64)), tokens),
        "roberta": (lambda: T.RobertaForMaskedLM(T.RobertaConfig(
            vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
            max_position_embeddings=80)), lambda b, t: {"input_ids": torch.randint(3, 128, (b, t))}),
        "bart": (lambda: T.BartForConditionalGeneration(T.BartConfig(
            vocab_size=128, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=64)),
            lambda b, t: {**tokens(b, t), "decoder_input_ids": torch.randint(0, 128, (b, t - 2))}),
        "qwen2_moe": (lambda: T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(
            **DECODER, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
            shared_expert_intermediate_size=128)), tokens),
        "deepseek_v3": (lambda: T.DeepseekV3ForCausalLM(T.DeepseekV3Config(**LATENT, **EXPERTS)), tokens),
        "deepseek_v2": (lambda: T.DeepseekV2ForCausalLM(T.DeepseekV2Config(**LATENT, **EXPERTS)), tokens),
        "glm4_moe_lite": (lambda: T.Glm4MoeLiteForCausalLM(T.Glm4MoeLiteConfig(**LATENT, **EXPERTS)), tokens),
        "minicpm3": (lambda: T.MiniCPM3ForCausalLM(T.MiniCPM3Config(**LATENT)), tokens),
        "qwen3_moe": (lambda: T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(
            **DECODER, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)), tokens),
        "gpt_oss": (lambda: T.GptOssForCausalLM(T.GptOssConfig(
            **{**DECODER, "attn_implementation": "eager"}, head_dim=16, num_local_experts=4, num_experts_per_tok=2)),
                    tokens),
        "smollm3": (lambda: T.SmolLM3ForCausalLM(T.SmolLM3Config(**DECODER, pad_token_id=0)), tokens),
        "glm4": (lambda: T.Glm4ForCausalLM(T.Glm4Config(**DECODER, head_dim=16, pad_token_id=0)), tokens),
        "ernie4_5": (lambda: T.Ernie4_5ForCausalLM(T.Ernie4_5Config(**DECODER, head_dim=16)), tokens),
        "helium": (lambda: T.HeliumForCausalLM(T.HeliumConfig(**DECODER, head_dim=16)), tokens),
        "whisper": (lambda: T.WhisperForConditionalGeneration(T.WhisperConfig(
            vocab_size=128, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16,
            max_source_positions=16, max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            decoder_start_token_id=1)),  # the encoder takes exactly 2 x max_source_positions frames
            lambda b, t: {"input_features": torch.randn(b, 16, 32), "decoder_input_ids": torch.randint(3, 128, (b, t))}),
        # state-space and linear-attention language models: no attention, a recurrence over time
        "mamba": (lambda: T.MambaForCausalLM(T.MambaConfig(vocab_size=128, hidden_size=64, state_size=8, num_hidden_layers=2,
                                                           expand=2, conv_kernel=4, time_step_rank=8, use_cache=False)),
                  tokens),
        "rwkv": (lambda: T.RwkvForCausalLM(T.RwkvConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2,
                                                        attention_hidden_size=64, intermediate_size=128,
                                                        context_length=64, use_cache=False)), tokens),
    }


def logits(output):
    return getattr(output, "logits", output)


def run(name: str, build, inputs, folder: Path, length: int = 11) -> str:
    torch.manual_seed(0)
    x = inputs(2, 8)
    model, handle = sparsify.sparsify(build().eval(), POLICY, x)
    found = (f"{len(handle.sites)} sites, {len(handle.coupling.groups)} groups, "
             f"{len(handle.coupling.attentions)} attentions, {len(handle.analysis.linearized)} linearized")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    handle.attach(optimizer, total_steps=8)
    for _ in range(8):
        loss = logits(model(**x)).float().square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        for group in handle.coupling.groups:
            if isinstance(group, ChainGroup) and "attention" not in group.trail:
                dst = handle.sites[group.dst].module
                dst.mask[:, : dst.in_features // 4] = False
                dst.apply_mask()
        for attention in handle.coupling.attentions:  # nothing reads the first group's heads
            dot = next(g for g in handle.coupling.groups if isinstance(g, DotGroup) and (g.q, g.k) == (attention.q, attention.k))
            o = next((g.dst for g in handle.coupling.groups if isinstance(g, ChainGroup) and g.src == attention.v
                      and "attention" in g.trail), None)
            if o is not None:
                q_heads, _, share = dot.heads()
                first, out = share[0], handle.sites[o].module
                width = out.in_features // q_heads  # o's columns per head: v's head size
                out.mask[:, min(first) * width:(max(first) + 1) * width] = False
                out.apply_mask()
    model.eval()
    report = handle.export(folder / f"{name}.onnx", x, held_out=[inputs(3, length)], compare_dense=False)
    p = report["parameters"]
    pretrained = report.get("hf_pretrained", {})
    attentions = len(handle.coupling.attentions)
    why = sorted({w for w in report["not_shrunk"].values() if w.startswith("attention")})
    heads = f"{len(report['heads'])} of {attentions}" + (f" ({why[0][:160]})" if why else "")
    return (f"{found} | {p['after']:,} of {p['before']:,} | {heads} | {report['torch_max_abs_diff']:.1e} | "
            f"{report['onnxruntime_max_abs_diff']:.1e} | "
            f"{'reloads' if pretrained.get('written') else 'not written: ' + ' '.join(pretrained.get('why', '-').split())}")


def csr_against_masked(build, inputs, optimizer_class) -> float:
    """The largest relative difference between the losses of 4 steps on the csr and masked backends."""
    losses = {}
    for backend in ("masked", "csr"):
        torch.manual_seed(0)
        x = inputs(2, 8)
        policy = {"version": 1, "unmatched": "sparsify", "defaults": {
            "density": 0.04, "backend": backend, "method": "SET", "update": {"every": 2, "unit": "steps"}}}
        model, handle = sparsify.sparsify(build().eval(), policy, x)
        optimizer = optimizer_class(model.parameters(), lr=1e-3)
        handle.attach(optimizer, total_steps=10)
        losses[backend] = []
        for _ in range(4):
            loss = logits(model(**x)).float().square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses[backend].append(float(loss))
    return max(abs(a - b) / abs(a) for a, b in zip(losses["masked"], losses["csr"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated architecture names")
    parser.add_argument("--length", type=int, default=11,
                        help="the held-out inputs' length (8: the example's, which a loop unrolled by the capture fixes)")
    args = parser.parse_args()
    catalog = architectures()
    names = args.only.split(",") if args.only else list(catalog)
    warnings.filterwarnings("ignore")
    T.logging.set_verbosity_error()
    print(f"# {datetime.date.today()} · torch {torch.__version__} · transformers {T.__version__}\n")
    print("| architecture | found | parameters after shrink | attentions that lost a head group | torch diff "
          "| onnxruntime diff | save_pretrained | csr / masked losses, max rel diff, AdamW | SGD | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            build, inputs = catalog[name]
            start = time.perf_counter()
            try:
                row = run(name, build, inputs, Path(tmp), args.length)
            except SparsifyError as exc:
                cause = str(exc).replace("\n", " ").replace("|", "/")
                row = f"**failed**: {type(exc).__name__}: {cause[:400]} | | | | | "
            try:
                csr = " | ".join(f"{csr_against_masked(build, inputs, o):.1e}" for o in (torch.optim.AdamW, torch.optim.SGD))
            except SparsifyError as exc:
                csr = f"**failed**: {type(exc).__name__}: {str(exc)[:200]} |"
            print(f"| {name} | {row} | {csr} | {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
