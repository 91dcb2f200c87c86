"""Small attentions and MLPs written the ways real models write them (fixed head counts, fused
layers, grouped-query heads, complex rotary embeddings), for the shrink, retrace and export tests."""

import torch

class FusedFixedHeads(torch.nn.Module):
    """nanoGPT's attention with scaled_dot_product_attention: q, k and v split from one layer by the
    residual width, views that fix the head count."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.dim, self.heads = dim, heads
        self.c_attn, self.c_proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in self.c_attn(x).split(self.dim, 2))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class Blocks(torch.nn.Module):
    """Residual blocks around an attention, and a head."""

    def __init__(self, attention=FusedFixedHeads, dim=32, layers=2):
        super().__init__()
        self.blocks = torch.nn.ModuleList([attention() for _ in range(layers)])
        self.norm, self.head = torch.nn.LayerNorm(dim), torch.nn.Linear(dim, 7)

    def forward(self, x):
        for block in self.blocks:
            x = x + block(self.norm(x))
        return self.head(x)


class InlineBlock(torch.nn.Module):
    """Attention written inline in a block whose MLP sits beside it: the block holds the attention."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (torch.nn.Linear(dim, dim) for _ in range(4))
        self.fc1, self.fc2 = torch.nn.Linear(dim, 64), torch.nn.Linear(64, dim)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.heads, C // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        x = x + self.o(torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, C))
        return self.fc2(torch.relu(self.fc1(x)))


class ReferenceLlamaAttention(torch.nn.Module):
    """LLaMA's reference attention: views of n_heads and n_kv_heads, rotary embedding (rotate half),
    repeat_kv by expand and reshape, output viewed as (B, T, -1)."""

    def __init__(self, dim=64, n_heads=4, n_kv_heads=2, max_len=16):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.wq = torch.nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk, self.wv = (torch.nn.Linear(dim, n_kv_heads * self.head_dim, bias=False) for _ in range(2))
        self.wo = torch.nn.Linear(n_heads * self.head_dim, dim, bias=False)
        angles = torch.outer(torch.arange(max_len), 1e4 ** (-torch.arange(0, self.head_dim, 2) / self.head_dim))
        self.register_buffer("cos", torch.cat([angles.cos()] * 2, -1), persistent=False)
        self.register_buffer("sin", torch.cat([angles.sin()] * 2, -1), persistent=False)

    def rotary(self, x, T):
        half = self.head_dim // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
        return x * self.cos[:T, None, :] + rotated * self.sin[:T, None, :]

    def counts(self):
        return self.n_heads, self.n_kv_heads

    def forward(self, x):
        B, T, _ = x.shape
        n_heads, n_kv_heads = self.counts()
        q = self.rotary(self.wq(x).view(B, T, n_heads, self.head_dim), T)
        k = self.rotary(self.wk(x).view(B, T, n_kv_heads, self.head_dim), T)
        v = self.wv(x).view(B, T, n_kv_heads, self.head_dim)
        n_rep = n_heads // n_kv_heads
        k, v = (t[:, :, :, None, :].expand(B, T, n_kv_heads, n_rep, self.head_dim)
                .reshape(B, T, n_kv_heads * n_rep, self.head_dim) for t in (k, v))
        y = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                             is_causal=True)
        return self.wo(y.transpose(1, 2).contiguous().view(B, T, -1))


class CountsInATuple(ReferenceLlamaAttention):
    """The same attention with its head counts in a tuple, which no integer attribute holds."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.shape = (self.n_heads, self.n_kv_heads)
        del self.n_heads, self.n_kv_heads

    def counts(self):
        return self.shape


class ComplexRotaryAttention(ReferenceLlamaAttention):
    """The same attention with Meta's rotary embedding: pairs of features as complex numbers,
    multiplied by a complex buffer unsqueezed over the heads."""

    def __init__(self, max_len=16, **kwargs):
        super().__init__(max_len=max_len, **kwargs)
        angles = torch.outer(torch.arange(max_len), 1e4 ** (-torch.arange(0, self.head_dim, 2) / self.head_dim))
        self.register_buffer("freqs_cis", torch.polar(torch.ones_like(angles), angles), persistent=False)

    def rotary(self, x, T):
        pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(pairs * self.freqs_cis[:T].unsqueeze(1)).flatten(3).type_as(x)


class SharedKvHeads(torch.nn.Module):
    """Grouped-query attention left to scaled_dot_product_attention (``enable_gqa=True``: 2 kv heads
    for 4 q heads, never repeated in the model's code), head counts read from the tensors."""

    def __init__(self, dim=64, n_heads=4, n_kv_heads=2):
        super().__init__()
        self.head_dim = dim // n_heads
        self.wq, self.wo = torch.nn.Linear(dim, dim, bias=False), torch.nn.Linear(dim, dim, bias=False)
        self.wk, self.wv = (torch.nn.Linear(dim, n_kv_heads * self.head_dim, bias=False) for _ in range(2))

    def forward(self, x):
        B, T, _ = x.shape
        q, k, v = (layer(x).view(B, T, -1, self.head_dim).transpose(1, 2) for layer in (self.wq, self.wk, self.wv))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class GainedHeads(FusedFixedHeads):
    """A learned gain per head, broadcast as [1, heads, 1, 1]: rewriting the views is not enough."""

    def __init__(self):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.linspace(0.5, 1.5, self.heads).view(1, self.heads, 1, 1))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in self.c_attn(x).split(self.dim, 2))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v) * self.gain
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class LoopedHeads(FusedFixedHeads):
    """A scale per head applied in a Python loop over the head count: the graph reads head 3 by index."""

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.heads, C // self.heads).transpose(1, 2) for t in self.c_attn(x).split(self.dim, 2))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        y = torch.stack([y[:, h] * (h + 1) for h in range(self.heads)], 1)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class FixedHeads(torch.nn.Module):
    """Attention whose views fix the head count, as the whole model."""

    def __init__(self, dim=32, heads=4):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (torch.nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.heads, C // self.heads).transpose(1, 2) for p in (self.q, self.k, self.v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(B, T, C))


class FusedGatedMLP(torch.nn.Module):
    """A gated MLP whose gate and up projections are one layer (Phi-3's gate_up_proj), its output
    split by ``chunk(2)``, by a width the module holds, or at a fixed index."""

    def __init__(self, split, dim=16, hidden=32):
        super().__init__()
        self.split, self.hidden = split, hidden
        self.gate_up, self.down = torch.nn.Linear(dim, 2 * hidden), torch.nn.Linear(hidden, dim)

    def forward(self, x):
        h = self.gate_up(x)
        if self.split == "chunk":
            gate, up = h.chunk(2, -1)
        elif self.split == "width":
            gate, up = h.split(self.hidden, -1)
        else:
            gate, up = h[..., :32], h[..., 32:]
        return self.down(torch.nn.functional.silu(gate) * up)


class FusedMLPs(torch.nn.Module):
    def __init__(self, split):
        super().__init__()
        self.embed, self.head = torch.nn.Linear(8, 16), torch.nn.Linear(16, 3)
        self.blocks = torch.nn.ModuleList([FusedGatedMLP(split) for _ in range(2)])

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


class FixedWidthScale(torch.nn.Module):
    """An MLP whose hidden features are scaled by a tensor its code makes at a fixed width: cutting
    its hidden neurons makes the model fail, so the shrink must leave them."""

    def __init__(self, dim=8, hidden=32):
        super().__init__()
        self.hidden = hidden
        self.fc1, self.fc2 = torch.nn.Linear(dim, hidden), torch.nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)) * torch.linspace(0.5, 1.5, self.hidden))
