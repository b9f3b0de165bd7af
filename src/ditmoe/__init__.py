"""ditmoe: sparse Mixture-of-Experts diffusion transformers (DiT-MoE).

Importing the package is cheap: torch and everything heavy load on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .config import ModelConfig
from .registry import create_model, get_config, model_names

__all__ = ["ModelConfig", "create_model", "from_pretrained", "get_config", "model_names", "save_pretrained",
           "__version__"]

_LAZY = {"save_pretrained": "pretrained", "from_pretrained": "pretrained"}


def __getattr__(name: str):
    # Model folders load torch and safetensors: imported on first use, not with the package.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
