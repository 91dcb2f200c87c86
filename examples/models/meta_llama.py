"""A LLaMA decoder written the way Meta's reference code and torchtitan write it: the rotary
embedding in complex numbers (each head's features in pairs (2d, 2d+1) viewed as complex numbers,
multiplied by a precomputed ``freqs_cis`` of unit complex numbers), head counts fixed in the views
(``view(B, T, n_heads, head_dim)``), key/value heads repeated for grouped-query attention
(4 query heads share 2 key/value heads) and a SwiGLU feed-forward named w1, w2, w3."""
import torch
from torch import nn
from torch.nn import functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)


def unit_rotations(head_dim, length, theta=10000.0):
    """exp(i * t * theta^(-2d / head_dim)) for positions t and pairs d: (length, head_dim / 2), complex."""
    frequencies = theta ** (-torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(length).float(), frequencies)
    return torch.polar(torch.ones_like(angles), angles)


def rotate(x, freqs_cis):
    """x: (B, T, heads, head_dim); its pairs turned by the angles of their positions."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (B, T, heads, head_dim / 2)
    turned = pairs * freqs_cis.unsqueeze(1)  # (T, 1, head_dim / 2) against (B, T, heads, head_dim / 2)
    return torch.view_as_real(turned).flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, dim, n_heads, n_kv_heads):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.wq = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def forward(self, x, freqs_cis):
        B, T, _ = x.shape
        q = rotate(self.wq(x).view(B, T, self.n_heads, self.head_dim), freqs_cis)
        k = rotate(self.wk(x).view(B, T, self.n_kv_heads, self.head_dim), freqs_cis)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        repeats = self.n_heads // self.n_kv_heads
        k, v = (t[:, :, :, None, :].expand(B, T, self.n_kv_heads, repeats, self.head_dim)
                .reshape(B, T, self.n_heads, self.head_dim) for t in (k, v))
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.wo(y.transpose(1, 2).contiguous().view(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, dim, n_heads, n_kv_heads, hidden):
        super().__init__()
        self.attention_norm, self.ffn_norm = RMSNorm(dim), RMSNorm(dim)
        self.attention = Attention(dim, n_heads, n_kv_heads)
        self.feed_forward = FeedForward(dim, hidden)

    def forward(self, x, freqs_cis):
        x = x + self.attention(self.attention_norm(x), freqs_cis)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, vocab=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden=128, max_len=32):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList([TransformerBlock(dim, n_heads, n_kv_heads, hidden) for _ in range(n_layers)])
        self.norm = RMSNorm(dim)
        self.output = nn.Linear(dim, vocab, bias=False)
        self.register_buffer("freqs_cis", unit_rotations(dim // n_heads, max_len), persistent=False)

    def forward(self, tokens):
        x = self.tok_embeddings(tokens)
        freqs_cis = self.freqs_cis[: tokens.shape[1]]
        for layer in self.layers:
            x = layer(x, freqs_cis)
        return self.output(self.norm(x))


def build_model():
    torch.manual_seed(0)
    return Transformer()


def example_inputs():
    return (torch.randint(0, 128, (2, 8)),)
