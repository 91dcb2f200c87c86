"""A small linear-attention language model whose time mixing is a per-channel recurrence (as RWKV
writes it): r = W_r x, k = W_k x, v = W_v x, then step by step over time
state_t = decay * state_{t-1} + k_t * v_t, channel by channel, and out = W_o (sigmoid(r) * state).
Each channel of the three projections is one feature: r, k and v are multiplied together, so they
lose a row together or not at all.

``loop`` says how the recurrence is written: ``"fixed"`` runs a Python loop over a length fixed at
construction (``symbolic_trace`` unrolls it), ``"unbind"`` loops over the time steps of the input
(``x.unbind(1)``: symbolic_trace cannot iterate a traced value, torch.export unrolls the loop for the
example's length), ``"cumsum"`` writes it without a loop, as a weighted prefix sum over time."""
import torch
from torch import nn


class TimeMix(nn.Module):
    """Receptance-gated key-value recurrence: the time mixing of one block."""

    def __init__(self, dim: int, hidden: int, length: int, loop: str):
        super().__init__()
        self.length, self.loop = length, loop
        self.receptance, self.key, self.value = (nn.Linear(dim, hidden, bias=False) for _ in range(3))
        self.output = nn.Linear(hidden, dim, bias=False)
        self.decay = nn.Parameter(torch.linspace(0.5, 0.95, hidden))  # [hidden]: one decay per channel

    def forward(self, x):  # x: (B, T, dim)
        receptance, kv = self.receptance(x), self.key(x) * self.value(x)  # (B, T, hidden)
        recurrence = self.recur(kv)
        return self.output(torch.sigmoid(receptance) * recurrence)

    def recur(self, kv):
        if self.loop == "cumsum":  # state_t = sum_{s <= t} decay^(t - s) kv_s, as one prefix sum
            steps = torch.arange(kv.shape[1], dtype=kv.dtype, device=kv.device)[:, None]  # (T, 1)
            powers = self.decay ** steps  # (T, hidden)
            return torch.cumsum(kv / powers, dim=1) * powers
        steps = kv.unbind(1) if self.loop == "unbind" else [kv[:, t] for t in range(self.length)]
        state = torch.zeros_like(steps[0])  # (B, hidden)
        states = []
        for step in steps:
            state = self.decay * state + step
            states.append(state)
        return torch.stack(states, 1)  # (B, T, hidden)


class ChannelMix(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.up, self.down = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)).square())


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int, length: int, loop: str):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.time, self.channel = TimeMix(dim, hidden, length, loop), ChannelMix(dim, 2 * dim)

    def forward(self, x):
        x = x + self.time(self.norm1(x))
        return x + self.channel(self.norm2(x))


class RecurrentLM(nn.Module):
    """Token ids (B, T) -> logits (B, T, vocab)."""

    def __init__(self, vocab: int = 96, dim: int = 32, hidden: int = 64, layers: int = 2, length: int = 8,
                 loop: str = "fixed"):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList([Block(dim, hidden, length, loop) for _ in range(layers)])
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def build_model(loop: str = "fixed"):
    torch.manual_seed(0)
    return RecurrentLM(loop=loop).eval()


def example_inputs():
    return (torch.randint(0, 96, (2, 8)),)
