"""ditmoe: sparse Mixture-of-Experts diffusion transformers (DiT-MoE).

Importing the package is cheap: torch and everything heavy load on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .config import ModelConfig
from .registry import create_model, get_config, model_names

__all__ = ["ModelConfig", "create_model", "get_config", "model_names", "__version__"]
