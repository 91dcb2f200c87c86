"""The LLaMA-style decoder of examples/models/llama.py with meaningless module and class names:
coupling analysis must find the same groups, since it reads dataflow, not names.

The model is that file's own code with its names replaced token by token, so the two cannot
drift apart in anything but their names."""
import io
import tokenize
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[2] / "examples" / "models" / "llama.py"
RENAMES = {
    "Llama": "Net", "DecoderLayer": "Blk", "Attention": "Mixer", "MLP": "Ffn",
    "embed_tokens": "t", "layers": "u", "norm": "w", "lm_head": "x",
    "input_norm": "n1", "self_attn": "p", "post_attention_norm": "n2", "mlp": "q",
    "q_proj": "a", "k_proj": "b", "v_proj": "c", "o_proj": "d",
    "gate_proj": "e", "up_proj": "f", "down_proj": "g",
}


def _renamed(source: str) -> str:
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return tokenize.untokenize(
        (tok.type, RENAMES.get(tok.string, tok.string) if tok.type == tokenize.NAME else tok.string)
        for tok in tokens)


exec(compile(_renamed(SOURCE.read_text()), f"{SOURCE} (renamed)", "exec"), globals())
