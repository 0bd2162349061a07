"""A GPT-style decoder with a tied LM head: one parameter used by the first and the last stage."""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with separate q/k/v projections."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def _split_heads(self, x: Tensor) -> Tensor:
        """Returns x (B, T, d_model) reshaped to (B, n_heads, T, head_dim)."""
        # unflatten on the last dim needs no B or T, so the traced graph has no size nodes here.
        return x.unflatten(-1, (self.n_heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: Tensor) -> Tensor:
        """Returns the (B, T, d_model) attention output."""
        q = self._split_heads(self.q_proj(x))
        k = self._split_heads(self.k_proj(x))
        v = self._split_heads(self.v_proj(x))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(y.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    """The position-wise MLP: Linear to `hidden`, GELU, Linear back."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, d_model)

    def forward(self, x: Tensor) -> Tensor:
        """Returns the (B, T, d_model) MLP output."""
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """A pre-LN decoder block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = FeedForward(d_model, 4 * d_model)

    def forward(self, x: Tensor) -> Tensor:
        """Returns the (B, T, d_model) block output."""
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    """Maps tokens (B, T) int64 to next-token logits (B, T, vocab_size)."""

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, n_heads: int, seq_len: int) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(seq_len, d_model)
        self.blocks = nn.ModuleList(Block(d_model, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)
        # Tied weights: one Parameter read by the first and last layers, which a pipeline
        # must either keep on one stage or share (and all-reduce the gradient of) across two.
        self.lm_head.weight = self.tok_emb.weight
        # GPT-2's init; nn.Embedding's N(0, 1) would give logits of std ~8 through the tied head.
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        """Returns the (B, T, vocab_size) logits."""
        pos = torch.arange(tokens.size(1), device=tokens.device)
        x = self.tok_emb(tokens) + self.pos_emb(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def loss_fn(logits: Tensor, target: Tensor) -> Tensor:
    """Returns the cross-entropy averaged over all B*T tokens (equal micro-batches average to it)."""
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def build(
    batch_size: int = 8,
    seed: int = 0,
    *,
    vocab_size: int = 4096,
    d_model: int = 64,
    n_layers: int = 4,
    n_heads: int = 4,
    seq_len: int = 32,
) -> tuple[nn.Module, tuple[Tensor, ...], Callable[[Tensor, Tensor], Tensor], Tensor]:
    """Returns (model, (tokens,), loss_fn, target): tokens and target (B, seq_len) int64.

    The target is the input shifted by one token. The same seed gives the same parameters and data.
    """
    torch.manual_seed(seed)
    model = GPT(vocab_size, d_model, n_layers, n_heads, seq_len)
    sequence = torch.randint(0, vocab_size, (batch_size, seq_len + 1))
    tokens, target = sequence[:, :-1].contiguous(), sequence[:, 1:].contiguous()
    return model, (tokens,), loss_fn, target
