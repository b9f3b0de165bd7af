"""Parameter and FLOP accounting by the paper's definitions.

"GFLOPs" in the DiT-MoE paper are multiply-accumulates of the linear layers for one image:
per token the attention projections, the router, the k routed experts and the shared expert, the
patch embedding and the final linear; per image the adaLN modulations and the timestep MLP. The
attention products QK^T and AV are left out (`gmacs_with_attention` adds them, which is how the
dense DiT paper counts, e.g. 118.6 for DiT-XL/2).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .config import ModelConfig


@dataclass
class ModelStats:
    name: str
    total_params: int
    activated_params: int  # per token: every weight except the (E - k) routed experts not chosen
    gmacs: float  # the paper's "GFLOPs" (linear layers only), one image at `image_size`
    gmacs_with_attention: float
    tokens: int
    image_size: int
    # Mean routed experts per token (k for top-k routers; from the capacity for expert_choice; the
    # training-time k for race, whose inference threshold decides per token).
    experts_per_token: float = 0.0
    note: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _expert_params(cfg: ModelConfig) -> int:
    d, h = cfg.hidden_size, cfg.routed_hidden
    return 3 * d * h if cfg.expert_type == "swiglu" else 2 * d * h + h + d


def model_stats(cfg: ModelConfig, image_size: int = 256, vae_downsample: int = 8) -> ModelStats:
    """Count parameters on the meta device (no memory) and MACs analytically.

    The latent side is image_size / vae_downsample (32 for a 256x256 image with the SD VAE).
    """
    import torch

    from .models.dit import DiT

    with torch.device("meta"):
        model = DiT(cfg)
    total = sum(p.numel() for p in model.parameters())
    n_moe = sum(cfg.moe_blocks())
    d, p = cfg.hidden_size, cfg.patch_size
    tokens = cfg.tokens(image_size, vae_downsample)
    k, note = experts_per_token(cfg, tokens)
    inactive = round(n_moe * (cfg.num_experts - k) * _expert_params(cfg)) if n_moe else 0
    activated = total - inactive

    per_token = 0
    for is_moe in cfg.moe_blocks():
        per_token += 4 * d * d  # qkv + output projection
        if is_moe:
            per_token += cfg.num_experts * d  # router
            per_token += k * 3 * d * cfg.routed_hidden if cfg.expert_type == "swiglu" else k * 2 * d * cfg.routed_hidden
            per_token += 3 * d * cfg.shared_width
        else:
            per_token += (3 if cfg.dense_mlp_type == "swiglu" else 2) * d * cfg.dense_hidden
    per_token += p * p * cfg.in_channels * d  # patch embedding
    per_token += d * p * p * cfg.out_channels  # final linear
    per_image = cfg.depth * 6 * d * d + 2 * d * d  # adaLN of the blocks and of the final layer
    per_image += 256 * d + d * d  # timestep MLP
    macs = per_token * tokens + per_image
    attention = cfg.depth * 2 * tokens * tokens * d  # QK^T and AV
    return ModelStats(cfg.name, total, activated, macs / 1e9, (macs + attention) / 1e9, tokens, image_size,
                      float(k) if n_moe else 0.0, note if n_moe else "")


def experts_per_token(cfg: ModelConfig, tokens: int) -> tuple[float, str]:
    """(mean routed experts per token, a note on what the figure means) for cfg's router."""
    if cfg.router == "expert_choice":
        import math

        c = max(1, min(tokens, math.ceil(cfg.capacity_factor * tokens * cfg.top_k / cfg.num_experts - 1e-9)))
        return c * cfg.num_experts / tokens, f"expert_choice: {c} tokens per expert and image"
    if cfg.router == "token_pool":
        return (cfg.capacity_factor * cfg.top_k, "token_pool: capacity_factor * top_k per token in training (the pool's "
                "capacity); at inference the predictor's thresholds decide")
    if cfg.router == "prototype":
        return float(cfg.top_k), "prototype: top_k per conditional token; null-class tokens take the one unconditional expert"
    if cfg.router == "race":
        return float(cfg.top_k), "race: top_k per token on average in training; at inference the learned threshold decides"
    return float(cfg.top_k), ""


def format_count(n: float) -> str:
    """199.3M / 16.50B style, as the paper's table prints them."""
    if n >= 1e10:
        return f"{n / 1e9:.2f}B"
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    return f"{n / 1e6:.1f}M"
