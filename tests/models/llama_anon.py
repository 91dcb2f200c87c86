"""The LLaMA-style decoder of examples/models/llama.py with meaningless module and class names:
coupling analysis must find the same groups, since it reads dataflow, not names."""
import torch
from torch import nn
from torch.nn import functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


def rotate_half(x, half):
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((-x2, x1), dim=-1)


def rope_tables(seq_len, head_dim, base=10000.0):
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    freqs = torch.outer(torch.arange(seq_len).float(), inv_freq)  # (T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd)
    return emb.cos(), emb.sin()


class Mixer(nn.Module):
    def __init__(self, dim, n_heads, n_kv_heads):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = dim // n_heads
        self.a = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.b = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.c = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.d = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.a(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.b(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = self.c(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        half = self.head_dim // 2
        q = q * cos + rotate_half(q, half) * sin
        k = k * cos + rotate_half(k, half) * sin
        group = self.n_heads // self.n_kv_heads
        k = k[:, :, None].expand(B, self.n_kv_heads, group, T, self.head_dim).reshape(B, self.n_heads, T, self.head_dim)
        v = v[:, :, None].expand(B, self.n_kv_heads, group, T, self.head_dim).reshape(B, self.n_heads, T, self.head_dim)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, hd)
        return self.d(y.transpose(1, 2).reshape(B, T, -1))


class Ffn(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.e = nn.Linear(dim, hidden, bias=False)
        self.f = nn.Linear(dim, hidden, bias=False)
        self.g = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.g(F.silu(self.e(x)) * self.f(x))


class Blk(nn.Module):
    def __init__(self, dim, n_heads, n_kv_heads, hidden):
        super().__init__()
        self.n1 = RMSNorm(dim)
        self.p = Mixer(dim, n_heads, n_kv_heads)
        self.n2 = RMSNorm(dim)
        self.q = Ffn(dim, hidden)

    def forward(self, x, cos, sin):
        x = x + self.p(self.n1(x), cos, sin)
        return x + self.q(self.n2(x))


class Net(nn.Module):
    def __init__(self, vocab=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden=128):
        super().__init__()
        self.t = nn.Embedding(vocab, dim)
        self.u = nn.ModuleList([Blk(dim, n_heads, n_kv_heads, hidden) for _ in range(n_layers)])
        self.w = RMSNorm(dim)
        self.x = nn.Linear(dim, vocab, bias=False)
        self.head_dim = dim // n_heads

    def forward(self, tokens):
        T = tokens.shape[1]
        x = self.t(tokens)
        cos, sin = rope_tables(T, self.head_dim)  # (T, hd)
        for layer in self.u:
            x = layer(x, cos, sin)
        return self.x(self.w(x))


def build_model():
    torch.manual_seed(0)
    return Net()


def example_inputs():
    return (torch.randint(0, 128, (2, 8)),)
