"""A shrunk Hugging Face model's config rewritten to its new sizes (MLP widths, head counts), and
its ``save_pretrained`` folder, kept only once ``from_pretrained`` reloads it with the same outputs."""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsify.errors import first_line
from sparsify.export.onnx_file import max_diff, quiet, tensors


# Llama/BERT/NeoX/ViT..., GPT-2, OPT, Falcon, DistilBERT, T5; BART, Whisper, Marian (one per side);
# Qwen2-MoE's shared expert
MLP_SIZE_KEYS = ("intermediate_size", "n_inner", "ffn_dim", "ffn_hidden_size", "hidden_dim", "d_ff",
                 "encoder_ffn_dim", "decoder_ffn_dim", "shared_expert_intermediate_size")


def _mlp_sizes(config) -> dict[str, int]:
    """Every key of a Hugging Face config that sizes MLPs, with its size (GPT-2's n_inner and
    Falcon's ffn_hidden_size, when None, mean 4 x the model width)."""
    defaults = {"n_inner": "n_embd", "ffn_hidden_size": "hidden_size"}
    sizes = {}
    for key in MLP_SIZE_KEYS:
        if hasattr(config, key):
            size = getattr(config, key)
            if size is None and isinstance(getattr(config, defaults.get(key, ""), None), int):
                size = 4 * getattr(config, defaults[key])
            if isinstance(size, int):
                sizes[key] = size
    return sizes


def rewrite_mlp_sizes(shrunk: nn.Module, units: list) -> dict | None:
    """Rewrite each MLP size of a Hugging Face config (MLP_SIZE_KEYS) whose MLPs all kept the same
    width. A size kept apart for the encoder's or the decoder's MLPs counts only theirs (by module
    name); the reload check after save_pretrained tells whether the model reads what was written."""
    config = getattr(shrunk, "config", None)
    sizes = _mlp_sizes(config) if config is not None else {}
    if not sizes:
        if config is None or not units or not hasattr(shrunk, "save_pretrained"):
            return None
        return {"rewritten": False, "why": f"{type(config).__name__} has no MLP size ({', '.join(MLP_SIZE_KEYS)})"}
    rewritten, differ = {}, []
    for key, size in sizes.items():
        side = key.split("_")[0] if key.startswith(("encoder_", "decoder_")) else None
        widths = {len(u.kept) for u in units if u.width == size and (side is None or f"{side}." in u.dst)}
        if len(widths) == 1 and widths != {size}:
            rewritten[key] = widths.pop()
        elif len(widths) > 1:
            differ.append(key)
    for key, size in rewritten.items():
        setattr(config, key, size)
    why = {"why": f"the MLPs sized by {', '.join(differ)} kept different widths"} if differ else {}
    if rewritten:
        return {**rewritten, "rewritten": True, **why}
    return {**sizes, "rewritten": False, **(why or {"why": "no MLP changed width"})}


def rewrite_head_counts(shrunk: nn.Module, heads: list, attentions: int) -> dict | None:
    """Rewrite a Hugging Face config's head counts when every attention kept the same heads (the
    head size is written out as head_dim, since the config would otherwise derive it anew). A
    config with a head size of its own but no num_key_value_heads (T5's d_kv) gets its head count
    alone, where every kv head stayed with its q head. T5's relative position bias, one column per
    head shared by a stack's attentions, is named under "narrowed": the saved folder keeps the
    kept heads' columns (see :func:`narrow_heads`), which needs every attention to keep the same
    heads."""
    config = getattr(shrunk, "config", None)
    count = getattr(config, "num_attention_heads", None)
    if count is None or not heads:
        return None
    kept = {(len(h.kept), len(h.kept_kv)) for h in heads}
    if len(heads) != attentions or len(kept) != 1:
        return {"rewritten": False, "why": "the attentions kept different numbers of heads"}
    shared = [name for name, p in shrunk.named_parameters()
              if name.endswith(SHARED_PER_HEAD) and p.dim() == 2 and p.shape[1] == count]
    if shared and len({tuple(h.kept) for h in heads}) != 1:
        return {"rewritten": False, "why": f"the attentions kept different heads, and {shared[0]} (one column per "
                                           "head) is shared by them"}
    q_heads, kv_heads = kept.pop()
    narrowed = {"narrowed": shared} if shared else {}
    if not hasattr(config, "num_key_value_heads"):
        if not _stored(config, "head_dim"):
            return {"rewritten": False, "why": f"{type(config).__name__} has no num_key_value_heads or head_dim: its "
                                               "models derive the head size from the head count"}
        if kv_heads != q_heads:
            return {"rewritten": False, "why": f"{type(config).__name__} has no num_key_value_heads"}
        config.num_attention_heads = q_heads
        return {"rewritten": True, "num_attention_heads": q_heads, **narrowed}
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // count  # written out even where the
    # config had none (Phi-3 reads it if present); the reload check tells whether the model reads it
    try:
        config.head_dim = head_dim  # unchanged here; a derived head size (Falcon's property) cannot be set
    except AttributeError:
        return {"rewritten": False, "why": f"{type(config).__name__} derives head_dim from the head count: its models "
                                           "derive the head size"}
    config.num_attention_heads, config.num_key_value_heads = q_heads, kv_heads
    return {"rewritten": True, "num_attention_heads": q_heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
            **narrowed}


def _stored(config, key: str) -> bool:
    """Whether a Hugging Face config holds ``key`` itself (T5's head_dim is its d_kv), rather than
    deriving it (Falcon's head_dim property) or lacking it."""
    held = vars(config)
    return held.get(key, held.get(getattr(config, "attribute_map", {}).get(key))) is not None


SHARED_PER_HEAD = "relative_attention_bias.weight"  # T5, mT5, UMT5, LongT5: [buckets, heads]


@torch.no_grad()
def narrow_heads(model: nn.Module, names: list[str], kept: list[int]) -> None:
    """Cut the parameters ``names`` (one column per head) of the copy saved with save_pretrained to
    the kept heads' columns. The shrunk model itself keeps them whole: its attentions' graphs take
    their heads' slices of the bias they compute."""
    for name in names:
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        param = getattr(module, attr)
        setattr(module, attr, nn.Parameter(param[:, kept].clone(), requires_grad=param.requires_grad))


def save_pretrained(model: nn.Module, folder: Path, checks: list, reference: list, limit: float, use_cache: Any,
                     hint: str) -> dict:
    """``save_pretrained`` of a shrunk Hugging Face model, kept only when ``from_pretrained`` reloads
    it with its config and its outputs are within ``limit`` of the trained model's (the shrunk
    model's limit)."""
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        if use_cache is not None:
            model.config.use_cache = use_cache  # as trained; off only while checking
        with quiet(), contextlib.redirect_stderr(io.StringIO()):  # transformers' own progress bars
            try:
                model.save_pretrained(tmp)
            except Exception as exc:  # a secondary artifact: the ONNX and .pt2 stand, the report says why
                return {"written": False, "why": f"save_pretrained failed: {type(exc).__name__}: {exc}"}
            try:
                cache = {"use_cache": False} if hasattr(model.config, "use_cache") else {}
                loaded = type(model).from_pretrained(tmp, **cache).eval()
            except Exception as exc:  # the config does not describe the shrunk sizes
                return {"written": False, "why": "from_pretrained cannot reload it: its config does not describe "
                        f"the shrunk sizes ({'; '.join(filter(None, [hint, _unlike_config(model)])) or first_line(exc)[:300]})"}
        with torch.no_grad():
            diff = max(max_diff(r, tensors(c.call(loaded))) for r, c in zip(reference, checks))
        if not diff <= limit:
            return {"written": False, "why": f"reloaded, its outputs differ by {diff:.3g} (limit {limit:.3g})"}
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        return {"written": True, "folder": str(folder), "max_abs_diff": diff}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _unlike_config(model: nn.Module) -> str:
    """The weights of a Hugging Face ``model`` whose shapes its config does not give (a model of its
    class built from its config, on the meta device, for the shapes only)."""
    try:
        with torch.device("meta"):
            built = type(model)(model.config)
    except Exception:  # noqa: BLE001 - only a better reason is at stake
        return ""
    expected = {k: tuple(v.shape) for k, v in built.state_dict().items()}
    unlike = [f"{k} {list(v.shape)} where the config gives {list(expected[k])}" for k, v in model.state_dict().items()
              if k in expected and tuple(v.shape) != expected[k]]
    return "; ".join(unlike[:3]) + (f"; {len(unlike) - 3} more" if len(unlike) > 3 else "")
