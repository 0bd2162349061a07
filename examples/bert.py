"""A BERT-style classifier with a padding mask: a second model input that every layer reads."""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Added to the scores of padded keys. Finite, so a row's softmax stays defined; far below any
# real score, so padded keys get exactly zero weight in float32.
MASKED_SCORE = -1e9


class SelfAttention(nn.Module):
    """Multi-head bidirectional self-attention that ignores padded keys."""

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
        return x.unflatten(-1, (self.n_heads, self.head_dim)).transpose(1, 2)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """Returns the (B, T, d_model) attention output; mask is (B, T), 1 keep and 0 pad."""
        # Built from the raw mask inside every layer (not once at the top), so each pipeline
        # stage that holds a layer needs the model's second input itself.
        bias = (1.0 - mask)[:, None, None, :] * MASKED_SCORE
        q = self._split_heads(self.q_proj(x))
        k = self._split_heads(self.k_proj(x))
        v = self._split_heads(self.v_proj(x))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
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


class EncoderLayer(nn.Module):
    """A post-LN encoder layer as in BERT: ln1(x + attn(x)), then ln2(x + mlp(x))."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.attn = SelfAttention(d_model, n_heads)
        self.ln1 = nn.LayerNorm(d_model)
        self.mlp = FeedForward(d_model, 4 * d_model)
        self.ln2 = nn.LayerNorm(d_model)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """Returns the (B, T, d_model) layer output."""
        x = self.ln1(x + self.attn(x, mask))
        return self.ln2(x + self.mlp(x))


class Bert(nn.Module):
    """Maps tokens (B, T) int64 and mask (B, T) float to class logits (B, num_classes)."""

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, n_heads: int, seq_len: int,
                 num_classes: int) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(seq_len, d_model)
        self.emb_ln = nn.LayerNorm(d_model)
        self.layers = nn.ModuleList(EncoderLayer(d_model, n_heads) for _ in range(n_layers))
        self.pooler = nn.Linear(d_model, d_model)
        self.classifier = nn.Linear(d_model, num_classes)
        # BERT's init; nn.Embedding's N(0, 1) would swamp the position embedding.
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """Returns the (B, num_classes) logits, read from the first ([CLS]) position."""
        pos = torch.arange(tokens.size(1), device=tokens.device)
        x = self.emb_ln(self.tok_emb(tokens) + self.pos_emb(pos))
        for layer in self.layers:
            x = layer(x, mask)
        pooled = torch.tanh(self.pooler(x[:, 0]))
        return self.classifier(pooled)


def loss_fn(logits: Tensor, target: Tensor) -> Tensor:
    """Returns the cross-entropy averaged over the batch (equal micro-batches average to it)."""
    return F.cross_entropy(logits, target)


def padding_mask(batch_size: int, seq_len: int) -> Tensor:
    """Returns a (B, T) float mask, 1 keep and 0 pad, whose rows cycle through 0, 1/8, 2/8, 3/8 padding.

    Row 0 (and every fourth row) is unpadded and position 0 is always kept, so no row is all pad.
    """
    lengths = seq_len - (torch.arange(batch_size) % 4) * (seq_len // 8)
    return (torch.arange(seq_len)[None, :] < lengths[:, None]).float()


def build(
    batch_size: int = 8,
    seed: int = 0,
    *,
    vocab_size: int = 1024,
    d_model: int = 64,
    n_layers: int = 4,
    n_heads: int = 4,
    seq_len: int = 32,
    num_classes: int = 4,
) -> tuple[nn.Module, tuple[Tensor, ...], Callable[[Tensor, Tensor], Tensor], Tensor]:
    """Returns (model, (tokens, mask), loss_fn, target): tokens (B, T) int64, mask (B, T) float,
    target (B,) int64 in [0, num_classes). The same seed gives the same parameters and data."""
    torch.manual_seed(seed)
    model = Bert(vocab_size, d_model, n_layers, n_heads, seq_len, num_classes)
    mask = padding_mask(batch_size, seq_len)
    # Token 0 is the pad token, as in BERT; padded positions hold it.
    tokens = torch.randint(1, vocab_size, (batch_size, seq_len)) * mask.long()
    target = torch.randint(0, num_classes, (batch_size,))
    return model, (tokens, mask), loss_fn, target
