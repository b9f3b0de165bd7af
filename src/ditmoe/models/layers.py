"""Building blocks shared by dense DiT and DiT-MoE: embedders, patchify, attention, MLPs."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F



def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype products on x run in: autocast's on x's device where it is on, else x's."""
    return torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation; x (N, T, D), shift/scale (N, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    """(N, C, H, W) -> (N, T, D) with a stride-p convolution (official name: `proj`)."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, T, D), a view of (N, D, T)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of (possibly fractional) times t (N,) -> (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t, self.frequency_embedding_size).to(self.mlp[0].weight.dtype)
        return self.mlp(freq)


class LabelEmbedder(nn.Module):
    """Class embedding with one extra row (index num_classes) for the unconditional branch."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        # The null row always exists, so a model trained without label dropout can still be
        # asked for label == num_classes (it is then simply an untrained embedding).
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def token_drop(self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None) -> torch.Tensor:
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


class Attention(nn.Module):
    """Multi-head self-attention in either released layout.

    layout "qkv": timm names `qkv`, `proj` (DiT, DiT-MoE S/B).
    layout "fused_qknorm": `Wqkv`, LayerNorm on q and k per head (`q_norm`, `k_norm`), `out_proj`
    (DiT-MoE XL/G). The official XL/G code casts q, k to fp16 for flash-attention; we keep the
    input dtype and let autocast decide, which is the exact-math version of the same function.
    """

    def __init__(self, dim: int, num_heads: int, layout: str = "qkv"):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.layout = layout
        if layout == "qkv":
            self.qkv = nn.Linear(dim, dim * 3, bias=True)
            self.proj = nn.Linear(dim, dim, bias=True)
        elif layout == "fused_qknorm":
            self.Wqkv = nn.Linear(dim, dim * 3, bias=True)
            self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-6, elementwise_affine=True)
            self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6, elementwise_affine=True)
            self.out_proj = nn.Linear(dim, dim, bias=True)
        else:
            raise ValueError(f"unknown attention layout {layout!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        in_proj = self.qkv if self.layout == "qkv" else self.Wqkv
        qkv = in_proj(x).view(n, t, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.unbind(2)  # each (N, T, H, Dh)
        if self.layout == "fused_qknorm":
            q, k = self.q_norm(q), self.k_norm(k)
        # SDPA wants (N, H, T, Dh).
        out = self.attend(q.transpose(1, 2), k.transpose(1, 2).to(q.dtype), v.transpose(1, 2).to(q.dtype))
        out = out.transpose(1, 2).reshape(n, t, d)
        return (self.proj if self.layout == "qkv" else self.out_proj)(out)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attention(q, k, v)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(Dh)) v for q, k, v (N, H, T, Dh)."""
    return F.scaled_dot_product_attention(q, k, v)


class SwiGLU(nn.Module):
    """SiLU-gated MLP without biases (official names gate_proj, up_proj, down_proj)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GeluMLP(nn.Module):
    """The original DiT MLP: fc1, GELU(tanh), fc2, with biases."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=True)
        self.fc2 = nn.Linear(hidden, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def make_mlp(kind: str, dim: int, hidden: int) -> nn.Module:
    return SwiGLU(dim, hidden) if kind == "swiglu" else GeluMLP(dim, hidden)


# ----------------------------------------------------------------- position table
def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """Fixed position table (grid_size**2, embed_dim) for tokens in row-major order.

    The first half of the channels encodes a token's column, the second half its row, each as
    [sin | cos] of position * 10000^(-j / (d/4)), the layout of the released checkpoints.
    """
    half = embed_dim // 2
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
    return np.concatenate([_sincos(half, cols.reshape(-1)), _sincos(half, rows.reshape(-1))], axis=1)


def _sincos(dim: int, positions: np.ndarray) -> np.ndarray:
    freqs = 10000.0 ** (-np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = positions[:, None].astype(np.float64) * freqs[None]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
