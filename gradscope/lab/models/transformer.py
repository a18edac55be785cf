"""Transformers with the norm placement as a parameter: Post-LN, Pre-LN, or no residual at all.

Each attention and feed-forward sublayer is a ``Sublayer`` unit around a function ``fn``:

- ``"post"`` (Vaswani et al. 2017, "Add & Norm"):  y = LN(x + fn(x))
- ``"pre"``  (most modern models):                 y = x + fn(LN(x)), with a final LN
- ``"none"`` (the same sublayers without the skip): y = LN(fn(x))

so the skip is the only difference between ``"post"`` and ``"none"``. Every sublayer is a
declared block with ``fn`` as its residual branch. Without skips, attention collapses token
representations toward rank one within a few layers (Dong et al. 2021); at initialisation one
token's gradient at the last FFN is depth-independent for Post-LN and shrinks with depth for
Pre-LN (Xiong et al. 2020; measured in experiments/xiong_depth.py). No dropout, so runs are
deterministic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gradscope.lab.models.registry import register_model
from gradscope.recording.blocks import BlockSpec

NORM_PLACEMENTS = ("post", "pre", "none")


class SelfAttention(nn.Module):
    def __init__(self, d_model: int, heads: int, causal: bool) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by heads ({heads})")
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:  # [batch, tokens, d_model]
        q, k, v = (_split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # [batch, heads, tokens, d_head]
        return self.out(_merge_heads(y))


class CrossAttention(nn.Module):
    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:  # x: [batch, tgt, d], memory: [batch, src, d]
        k, v = (_split_heads(t, self.heads) for t in self.kv(memory).chunk(2, dim=-1))
        y = F.scaled_dot_product_attention(_split_heads(self.q(x), self.heads), k, v)
        return self.out(_merge_heads(y))


def _split_heads(t: Tensor, heads: int) -> Tensor:  # [b, n, d] -> [b, heads, n, d/heads]
    b, n, d = t.shape
    return t.view(b, n, heads, d // heads).transpose(1, 2)


def _merge_heads(t: Tensor) -> Tensor:  # [b, heads, n, d_head] -> [b, n, heads * d_head]
    b, h, n, dh = t.shape
    return t.transpose(1, 2).reshape(b, n, h * dh)


def feed_forward(d_model: int, d_ff: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_model, d_ff), nn.ReLU(), nn.Linear(d_ff, d_model))


class Sublayer(nn.Module):
    """One "Add & Norm" unit around ``fn`` with the model's norm placement."""

    def __init__(self, fn: nn.Module, d_model: int, norm: str) -> None:
        super().__init__()
        if norm not in NORM_PLACEMENTS:
            raise ValueError(f"norm must be one of {', '.join(NORM_PLACEMENTS)}, got {norm!r}")
        self.fn, self.norm, self.placement = fn, nn.LayerNorm(d_model), norm

    def forward(self, x: Tensor, *context: Tensor) -> Tensor:  # [batch, tokens, d_model]
        if self.placement == "pre":
            return x + self.fn(self.norm(x), *context)
        if self.placement == "post":
            return self.norm(x + self.fn(x, *context))
        return self.norm(self.fn(x, *context))


class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, heads: int, d_ff: int, norm: str, causal: bool) -> None:
        super().__init__()
        self.attn = Sublayer(SelfAttention(d_model, heads, causal), d_model, norm)
        self.ffn = Sublayer(feed_forward(d_model, d_ff), d_model, norm)

    def forward(self, x: Tensor) -> Tensor:
        return self.ffn(self.attn(x))


class DecoderLayer(nn.Module):
    def __init__(self, d_model: int, heads: int, d_ff: int, norm: str) -> None:
        super().__init__()
        self.self_attn = Sublayer(SelfAttention(d_model, heads, causal=True), d_model, norm)
        self.cross_attn = Sublayer(CrossAttention(d_model, heads), d_model, norm)
        self.ffn = Sublayer(feed_forward(d_model, d_ff), d_model, norm)

    def forward(self, x: Tensor, memory: Tensor) -> Tensor:
        return self.ffn(self.cross_attn(self.self_attn(x), memory))


class Embedding(nn.Module):
    """Token plus learned position embeddings."""

    def __init__(self, vocab_size: int, seq_len: int, d_model: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, d_model)
        self.positions = nn.Embedding(seq_len, d_model)

    def forward(self, ids: Tensor) -> Tensor:  # [batch, tokens] -> [batch, tokens, d_model]
        positions = torch.arange(ids.shape[1], device=ids.device)
        return self.tokens(ids) + self.positions(positions)


class _TransformerBase(nn.Module):
    norm: str

    def _finish(self, d_model: int) -> None:
        self.final_norm = nn.LayerNorm(d_model) if self.norm == "pre" else nn.Identity()
        _xavier_init(self)

    def gradscope_blocks(self) -> list[BlockSpec]:
        return [BlockSpec(name, branch=f"{name}.fn", residual=self.norm != "none")
                for name, m in self.named_modules() if isinstance(m, Sublayer)]


class TransformerEncoder(_TransformerBase):
    """Encoder stack: a classifier (mean over tokens) or, with ``causal=True``, a causal LM."""

    def __init__(self, *, vocab_size: int, seq_len: int, d_model: int, heads: int, depth: int,
                 d_ff: int, norm: str, causal: bool, num_classes: int | None) -> None:
        super().__init__()
        self.norm, self.depth, self.causal = norm, depth, causal
        self.embed = Embedding(vocab_size, seq_len, d_model)
        self.layers = nn.ModuleList(EncoderLayer(d_model, heads, d_ff, norm, causal) for _ in range(depth))
        self.head = nn.Linear(d_model, num_classes or vocab_size)
        self._finish(d_model)

    def forward(self, ids: Tensor) -> Tensor:  # [batch, tokens] -> [batch, classes] or [batch, tokens, vocab]
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
        h = self.final_norm(h)
        return self.head(h) if self.causal else self.head(h.mean(dim=1))


class TransformerSeq2Seq(_TransformerBase):
    """Encoder-decoder (Vaswani et al.): ``forward(source, target_in)`` -> logits per target token."""

    def __init__(self, *, vocab_size: int, seq_len: int, d_model: int, heads: int, depth: int,
                 d_ff: int, norm: str) -> None:
        super().__init__()
        self.norm, self.depth = norm, depth
        self.src_embed = Embedding(vocab_size, seq_len, d_model)
        self.tgt_embed = Embedding(vocab_size, seq_len, d_model)
        self.encoder = nn.ModuleList(EncoderLayer(d_model, heads, d_ff, norm, causal=False) for _ in range(depth))
        self.decoder = nn.ModuleList(DecoderLayer(d_model, heads, d_ff, norm) for _ in range(depth))
        self.encoder_norm = nn.LayerNorm(d_model) if norm == "pre" else nn.Identity()
        self.head = nn.Linear(d_model, vocab_size)
        self._finish(d_model)

    def forward(self, source: Tensor, target: Tensor) -> Tensor:  # [b, s], [b, t] -> [b, t, vocab]
        memory = self.src_embed(source)
        for layer in self.encoder:
            memory = layer(memory)
        memory = self.encoder_norm(memory)
        h = self.tgt_embed(target)
        for layer in self.decoder:
            h = layer(h, memory)
        return self.head(self.final_norm(h))


def _xavier_init(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            # unit-variance coordinates, what Vaswani et al.'s sqrt(d_model) scaling gives: token
            # vectors then start as distinct as the sublayer outputs added to them
            nn.init.normal_(m.weight, std=1.0)


SIZES = {"vocab_size": 32, "seq_len": 32, "d_model": 64, "heads": 4, "depth": 6, "d_ff": 256}


def _register(kind: str, norm: str) -> None:
    what = {"cls": "encoder classifier", "lm": "causal language model", "seq2seq": "encoder-decoder"}[kind]
    placement = {"post": "Post-LN", "pre": "Pre-LN", "none": "no residual"}[norm]
    defaults = {**SIZES, "norm": norm, **({"num_classes": 10} if kind == "cls" else {})}

    def factory(**config: object) -> nn.Module:
        if kind == "seq2seq":
            return TransformerSeq2Seq(**config)  # type: ignore[arg-type]
        config.setdefault("num_classes", None)
        return TransformerEncoder(causal=kind == "lm", **config)  # type: ignore[arg-type]

    register_model(f"transformer_{kind}_{norm}", family="transformer",
                   input_kind={"cls": "tokens"}.get(kind, kind), defaults=defaults,
                   description=f"Transformer {what}, {placement}")(factory)


for _kind in ("cls", "lm", "seq2seq"):
    for _norm in NORM_PLACEMENTS:
        _register(_kind, _norm)
