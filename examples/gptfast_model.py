"""A hand-written decoder LM in the style of gpt-fast, for slimfx to recognise.

Fused wqkv projection, a static KV cache written in place (`k_cache[:, :, pos] = k`),
interleaved (complex-pair) rotary embedding, RMSNorm and a SwiGLU MLP. No HF code.

    python examples/gptfast_model.py      # builds a tiny one and prints its anatomy
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelArgs:
    vocab_size: int = 256
    n_layer: int = 2
    n_head: int = 4
    n_local_heads: int = 2
    dim: int = 64
    intermediate_size: int = 128
    max_seq_len: int = 64
    rope_base: float = 10000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_head


class KVCache(nn.Module):
    def __init__(self, batch: int, args: ModelArgs, dtype=torch.float32):
        super().__init__()
        shape = (batch, args.n_local_heads, args.max_seq_len, args.head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype))
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype))

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        self.k_cache[:, :, input_pos] = k
        self.v_cache[:, :, input_pos] = v
        return self.k_cache, self.v_cache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def precompute_freqs(args: ModelArgs) -> torch.Tensor:
    """[max_seq_len, head_dim/2, 2] cos/sin pairs."""
    freqs = 1.0 / (args.rope_base ** (torch.arange(0, args.head_dim, 2).float() / args.head_dim))
    angles = torch.outer(torch.arange(args.max_seq_len).float(), freqs)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rotary(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, D] rotated pairwise by freqs [S, D/2, 2]."""
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    f = freqs.view(1, xs.size(1), 1, xs.size(3), 2)
    out = torch.stack(
        [xs[..., 0] * f[..., 0] - xs[..., 1] * f[..., 1], xs[..., 1] * f[..., 0] + xs[..., 0] * f[..., 1]], dim=-1
    )
    return out.flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        kv_dim = args.n_local_heads * args.head_dim
        self.wqkv = nn.Linear(args.dim, args.dim + 2 * kv_dim, bias=False)
        self.wo = nn.Linear(args.dim, args.dim, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x, freqs, mask, input_pos):
        a = self.args
        bsz, seqlen, _ = x.shape
        kv_dim = a.n_local_heads * a.head_dim
        q, k, v = self.wqkv(x).split([a.dim, kv_dim, kv_dim], dim=-1)
        q = q.view(bsz, seqlen, a.n_head, a.head_dim)
        k = k.view(bsz, seqlen, a.n_local_heads, a.head_dim)
        v = v.view(bsz, seqlen, a.n_local_heads, a.head_dim)
        q, k = apply_rotary(q, freqs), apply_rotary(k, freqs)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if self.kv_cache is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
        rep = a.n_head // a.n_local_heads
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0)
        return self.wo(y.transpose(1, 2).contiguous().view(bsz, seqlen, a.dim))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.w3 = nn.Linear(args.dim, args.intermediate_size, bias=False)
        self.w2 = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, freqs, mask, input_pos):
        h = x + self.attention(self.attention_norm(x), freqs, mask, input_pos)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layer))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.register_buffer("freqs", precompute_freqs(args), persistent=False)
        causal = torch.tril(torch.ones(args.max_seq_len, args.max_seq_len, dtype=torch.bool))
        self.register_buffer("causal_mask", causal, persistent=False)

    def setup_caches(self, batch: int) -> None:
        for layer in self.layers:
            layer.attention.kv_cache = KVCache(batch, self.args, self.output.weight.dtype)

    def forward(self, idx: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """idx [B, S] token ids at positions input_pos [S] -> logits [B, S, V]."""
        mask = self.causal_mask[None, None, input_pos]
        freqs = self.freqs[input_pos]
        x = self.tok_embeddings(idx)
        for layer in self.layers:
            x = layer(x, freqs, mask, input_pos)
        return self.output(self.norm(x))


def tiny_gptfast(seed: int = 0, batch: int = 1, **overrides) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**overrides)).eval()
    model.setup_caches(batch)
    return model


if __name__ == "__main__":
    from slimfx.compiler.anatomy import analyze, capture_graph

    model = tiny_gptfast()
    gm = capture_graph(model, torch.randint(0, 256, (1, 5)), torch.arange(5))
    print(analyze(gm).table())
