"""Named model sizes: "DiT-MoE-S/2-8E2A" -> ModelConfig, plus dense DiT baselines and "debug".

Names follow the paper: size letter, patch size, then ``{E}E{k}A`` (E routed experts, k active).
"""

from __future__ import annotations

from typing import Any

from .config import ModelConfig

# (depth, hidden, heads) of the DiT sizes.
_SIZES = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
    "G": (40, 1408, 16),
}
# The released XL and G checkpoints use the fused-qkv attention with q/k LayerNorm.
_QKNORM_SIZES = {"XL", "G"}


def _build_registry() -> dict[str, ModelConfig]:
    reg: dict[str, ModelConfig] = {}
    for size, (depth, hidden, heads) in _SIZES.items():
        layout = "fused_qknorm" if size in _QKNORM_SIZES else "qkv"
        for patch in (2, 4, 8):
            base = dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch)
            expert_variants = [(16, 2)] if size == "G" else [(8, 2), (16, 2)]
            if size == "G" and patch != 2:
                continue
            for e, k in expert_variants:
                name = f"DiT-MoE-{size}/{patch}-{e}E{k}A"
                reg[name] = ModelConfig(name=name, num_experts=e, top_k=k, attn_layout=layout, **base)
            if size != "G":
                name = f"DiT-{size}/{patch}"
                reg[name] = ModelConfig(name=name, num_experts=0, attn_layout="qkv", **base)
    # Fine-grained experts (DSMoE, arXiv 2512.01252): 48 experts of width 448 at D = 1024, k = 5, one
    # shared expert of the same width, DeepSeek-V3-style routing (sigmoid scores, selection bias,
    # renormalised top-k times 2.5). Any other router works too: --model-router.
    reg["DSMoE-L/2-E48"] = ModelConfig(
        name="DSMoE-L/2-E48", depth=24, hidden_size=1024, num_heads=16, patch_size=2, num_experts=48, top_k=5,
        expert_hidden=448, shared_hidden=448, router="topk_bias", norm_topk=True, route_scale=2.5,
    )
    # Tiny flavour for tests and smoke runs; same shape as the official fixtures.
    reg["debug"] = ModelConfig(
        name="debug", input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2,
        num_heads=4, num_classes=10, num_experts=4, top_k=2,
    )
    reg["debug-dense"] = reg["debug"].replace(name="debug-dense", num_experts=0)
    # The quickstart model: 28x28 one-channel MNIST in pixel space, 7x7 patches (16 tokens per
    # image), predicting the clean image (flow_prediction "data": a patch holds 49 values, which a
    # velocity network must carry through as noise). Sized so that training, sampling and analysis
    # fit a 2-core CPU; docs/recipe.md has the measurements that chose it.
    reg["DiT-MoE-mnist"] = ModelConfig(
        name="DiT-MoE-mnist", input_size=28, patch_size=7, in_channels=1, hidden_size=128, depth=4,
        num_heads=4, num_classes=10, learn_sigma=False, num_experts=8, top_k=2, expert_hidden=256,
        shared_hidden=128, timestep_scale=1000.0, flow_prediction="data",
    )
    reg["DiT-mnist"] = reg["DiT-MoE-mnist"].replace(name="DiT-mnist", num_experts=0)
    return reg


REGISTRY: dict[str, ModelConfig] = _build_registry()


def model_names() -> list[str]:
    return list(REGISTRY)


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """Look up a named size and apply overrides; raises ValueError listing known names."""
    if name not in REGISTRY:
        close = [n for n in REGISTRY if n.lower().replace("-", "") == name.lower().replace("-", "")]
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown model name {name!r}.{hint} Known models: {', '.join(REGISTRY)}")
    cfg = REGISTRY[name]
    if overrides:
        cfg = cfg.replace(**overrides)
    return cfg.validate()


def create_model(name: str | ModelConfig, device: Any = None, **overrides: Any):
    """Build a model by registry name (or from a ModelConfig) with optional overrides.

    ``device="meta"`` builds the module tree without allocating weights (e.g. to count the
    16.5B-parameter G model in seconds).
    """
    from .models.dit import DiT

    cfg = name.replace(**overrides).validate() if isinstance(name, ModelConfig) else get_config(name, **overrides)
    if device is None:
        return DiT(cfg)
    import torch

    with torch.device(device):
        return DiT(cfg)
