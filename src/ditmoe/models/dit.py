"""The DiT / DiT-MoE network, written for one device (parallelism is applied from outside)."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from .layers import (Attention, LabelEmbedder, PatchEmbed, TimestepEmbedder, get_2d_sincos_pos_embed, make_mlp,
                     modulate)
from .moe import MoE
from .routers import build_router


class DiTBlock(nn.Module):
    """adaLN-Zero block; the MLP is a MoE layer (`.moe`) or a dense MLP (`.mlp`)."""

    def __init__(self, cfg: ModelConfig, use_moe: bool):
        super().__init__()
        d = cfg.hidden_size
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(d, cfg.num_heads, cfg.attn_layout)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        if use_moe:
            router = build_router(cfg.router, d, cfg.num_experts, cfg.top_k, norm_topk=cfg.norm_topk,
                                  aux_alpha=cfg.balance_alpha, score=cfg.router_score,
                                  capacity_factor=cfg.capacity_factor, capacity_warmup_steps=cfg.capacity_warmup_steps,
                                  bias_update_rate=cfg.bias_update_rate,
                                  route_scale=cfg.route_scale, threshold_decay=cfg.threshold_decay,
                                  num_classes=cfg.num_classes, contrastive_weight=cfg.contrastive_weight,
                                  contrastive_temperature=cfg.contrastive_temperature,
                                  similarity_weight=cfg.similarity_weight)
            self.moe = MoE(d, cfg.num_experts, cfg.top_k, cfg.routed_hidden, cfg.shared_width,
                           kind=cfg.expert_type, router=router)
        else:
            self.mlp = make_mlp(cfg.dense_mlp_type, d, cfg.dense_hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d, bias=True))

    @property
    def is_moe(self) -> bool:
        return hasattr(self, "moe")

    def forward(self, x: torch.Tensor, c: torch.Tensor, y: torch.Tensor | None = None):
        """x (N, T, D), c (N, D), y (N,) the labels in use (after label dropout; routers that
        route by label read them) -> (x, balance loss or None)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        h, aux = self.feed_forward(modulate(self.norm2(x), shift_mlp, scale_mlp), y)
        return x + gate_mlp.unsqueeze(1) * h, aux

    def feed_forward(self, h: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The MoE layer (output, balance loss) or the dense MLP (output, None)."""
        return self.moe(h, y, return_aux=True) if self.is_moe else (self.mlp(h), None)


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Class-conditional diffusion transformer; MoE or dense per `cfg.moe_blocks()`.

    `model(x, t, y)` maps x (N, C, H, W), t (N,), y (N,) int64 (label == num_classes: no label)
    to (N, C_out, H, W). `return_aux=True` also returns the per-MoE-layer balance losses (L,).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.config = cfg
        d = cfg.hidden_size
        self.in_channels, self.out_channels = cfg.in_channels, cfg.out_channels
        self.patch_size, self.num_classes = cfg.patch_size, cfg.num_classes
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, d)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(cfg.num_classes, d, cfg.class_dropout_prob)
        # Fixed sin-cos table; a frozen Parameter (not a buffer) so state dicts match the official ones.
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, d), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(cfg, m) for m in cfg.moe_blocks()])
        self.final_layer = FinalLayer(d, cfg.patch_size, cfg.out_channels)
        self.gradient_checkpointing = False
        self.initialize_weights()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def initialize_weights(self) -> None:
        """DiT's init: Xavier linears, zeroed adaLN and output layers (adaLN-Zero)."""
        if self.pos_embed.is_meta:
            return

        def _basic_init(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(_basic_init)
        grid = int(self.config.num_patches ** 0.5)
        self.pos_embed.copy_(torch.from_numpy(get_2d_sincos_pos_embed(self.config.hidden_size, grid)).float().unsqueeze(0))
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    # --------------------------------------------------------------- helpers
    def moe_layers(self) -> list[tuple[int, MoE]]:
        return [(i, b.moe) for i, b in enumerate(self.blocks) if b.is_moe]

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, H, W)."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    # --------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, return_aux: bool = False):
        x = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        t_emb = self.t_embedder(t.float() * self.config.timestep_scale if self.config.timestep_scale != 1.0 else t)
        if self.training and self.y_embedder.dropout_prob > 0:  # the labels in use, for the routers too
            y = self.y_embedder.token_drop(y)
        c = t_emb + self.y_embedder(y, False)  # (N, D)
        aux_losses = []
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x, aux = checkpoint(block, x, c, y, use_reentrant=False)
            else:
                x, aux = block(x, c, y)
            if aux is not None:
                aux_losses.append(aux)
        x = self.unpatchify(self.final_layer(x, c))
        if not return_aux:
            return x
        aux = torch.stack(aux_losses) if aux_losses else x.new_zeros(0, dtype=torch.float32)
        return x, aux

    def forward_with_cfg(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float,
                         guided_channels: int | None = None) -> torch.Tensor:
        """Guided output for a batch whose second half holds the null labels (official convention).

        guided_channels=3 reproduces the official code, which guides only the first 3 channels;
        None guides all input channels (the standard).
        """
        half = x[: len(x) // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)
        n_guided = self.in_channels if guided_channels is None else guided_channels
        eps, rest = out[:, :n_guided], out[:, n_guided:]
        cond, uncond = eps.chunk(2, dim=0)
        guided = uncond + cfg_scale * (cond - uncond)
        return torch.cat([torch.cat([guided, guided], dim=0), rest], dim=1)
