"""Dense DiT <-> diffusers `DiTTransformer2DModel`.

What maps onto what (this package -> diffusers), every tensor copied unchanged except the fused
attention input projection, which is split in three:

- ``x_embedder.proj``                -> ``pos_embed.proj`` (the sin-cos table is a non-persistent
  buffer in diffusers, computed from the config; ours is the same fixed table)
- ``t_embedder.mlp.0 / .2``          -> ``transformer_blocks.i.norm1.emb.timestep_embedder.linear_1 / _2``
- ``y_embedder.embedding_table``     -> ``transformer_blocks.i.norm1.emb.class_embedder.embedding_table``
  (diffusers gives every block its own timestep / label embedder; the export copies ours into
  each, and the final layer uses block 0's, as ours uses the shared one)
- ``blocks.i.adaLN_modulation.1``    -> ``transformer_blocks.i.norm1.linear``: both chunk the 6 D
  outputs as shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, so rows map 1:1
- ``blocks.i.attn.qkv``              -> ``attn1.to_q / to_k / to_v`` (rows [0, D), [D, 2D), [2D, 3D):
  ours views the 3 D outputs as (3, heads, head_dim)); ``attn.proj`` -> ``attn1.to_out.0``
- ``blocks.i.mlp.fc1 / fc2``         -> ``ff.net.0.proj / ff.net.2`` (GELU-tanh, width 4 D)
- ``final_layer.adaLN_modulation.1`` -> ``proj_out_1`` (shift, scale: same order);
  ``final_layer.linear``             -> ``proj_out_2`` (output channels 2 C with learn_sigma)

The config sets ``norm_eps=1e-6`` (diffusers' default 1e-5 would change the MLP's LayerNorm) and
``num_embeds_ada_norm=num_classes`` (the label table keeps its extra null row).

One difference stays: diffusers' `CombinedTimestepLabelEmbeddings` builds the timestep sinusoid
with ``downscale_freq_shift=1`` (frequencies 10000^(-j / (128 - 1))), DiT and this package with
0 (10000^(-j / 128)); the attribute is fixed in diffusers' code, not in the config, so a saved
folder cannot carry it. The same weights then give slightly different outputs in diffusers (as
the facebook/DiT checkpoints on the Hub do). `exact_time_embedding(module)` sets the shift to 0 on
a loaded module, after which it computes this package's function up to rounding.

Only dense models with the original DiT block (GELU MLP of width 4 D, qkv attention) have a
diffusers class; DiT-MoE models are saved as ditmoe folders (`ditmoe.save_pretrained`).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

from .config import ModelConfig

DIFFUSERS_CLASS = "DiTTransformer2DModel"
SIDECAR = "ditmoe_config.json"  # this package's config and process, beside diffusers' config.json
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_DIT_NORM_EPS = 1e-6


def check_exportable(cfg: ModelConfig) -> None:
    """Refuse, with what to do instead, a model that DiTTransformer2DModel cannot express."""
    if cfg.is_moe:
        raise ValueError(
            f"{cfg.name} is a DiT-MoE model ({cfg.num_experts} experts): diffusers has no class for it. Save it as a "
            "ditmoe model folder instead (`ditmoe convert --to folder SRC DST`, or ditmoe.save_pretrained(model, DST)) "
            "and load it with ditmoe.from_pretrained(DST)")
    problems = []
    if cfg.dense_mlp_type != "gelu":
        problems.append(f"its MLPs are {cfg.dense_mlp_type} (diffusers' DiT block has GELU-tanh MLPs)")
    if cfg.dense_hidden != 4 * cfg.hidden_size:
        problems.append(f"its MLP width is {cfg.dense_hidden}, not 4 x {cfg.hidden_size} (diffusers' DiT block fixes 4 D)")
    if cfg.attn_layout != "qkv":
        problems.append(f"its attention is {cfg.attn_layout!r} (q/k LayerNorm), which diffusers' DiT block lacks")
    if problems:
        raise ValueError(f"{cfg.name} cannot be written as a diffusers {DIFFUSERS_CLASS}: " + "; ".join(problems)
                         + ". Save it as a ditmoe model folder instead (`ditmoe convert --to folder`)")


def diffusers_config(cfg: ModelConfig) -> dict[str, Any]:
    """The DiTTransformer2DModel constructor arguments of a dense DiT config."""
    check_exportable(cfg)
    return dict(num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_size // cfg.num_heads,
                in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_layers=cfg.depth, dropout=0.0,
                attention_bias=True, sample_size=cfg.input_size, patch_size=cfg.patch_size,
                activation_fn="gelu-approximate", num_embeds_ada_norm=cfg.num_classes, upcast_attention=False,
                norm_type="ada_norm_zero", norm_elementwise_affine=False, norm_eps=_DIT_NORM_EPS)


def to_diffusers_state_dict(model_or_sd, cfg: ModelConfig | None = None) -> dict[str, torch.Tensor]:
    """This package's dense state dict -> DiTTransformer2DModel's keys (see the module docstring)."""
    if isinstance(model_or_sd, torch.nn.Module):
        sd, cfg = model_or_sd.state_dict(), cfg or model_or_sd.config
    else:
        sd = dict(model_or_sd)
    if cfg is None:
        raise ValueError("to_diffusers_state_dict needs the model's config with a bare state dict")
    check_exportable(cfg)
    d = cfg.hidden_size
    out: dict[str, torch.Tensor] = {
        "pos_embed.proj.weight": sd["x_embedder.proj.weight"], "pos_embed.proj.bias": sd["x_embedder.proj.bias"],
        "proj_out_1.weight": sd["final_layer.adaLN_modulation.1.weight"],
        "proj_out_1.bias": sd["final_layer.adaLN_modulation.1.bias"],
        "proj_out_2.weight": sd["final_layer.linear.weight"], "proj_out_2.bias": sd["final_layer.linear.bias"],
    }
    for i in range(cfg.depth):
        src, dst = f"blocks.{i}.", f"transformer_blocks.{i}."
        emb = dst + "norm1.emb."
        for j, name in ((0, "linear_1"), (2, "linear_2")):
            out[f"{emb}timestep_embedder.{name}.weight"] = sd[f"t_embedder.mlp.{j}.weight"]
            out[f"{emb}timestep_embedder.{name}.bias"] = sd[f"t_embedder.mlp.{j}.bias"]
        out[emb + "class_embedder.embedding_table.weight"] = sd["y_embedder.embedding_table.weight"]
        out[dst + "norm1.linear.weight"] = sd[src + "adaLN_modulation.1.weight"]
        out[dst + "norm1.linear.bias"] = sd[src + "adaLN_modulation.1.bias"]
        for part, (lo, hi) in zip(("to_q", "to_k", "to_v"), ((0, d), (d, 2 * d), (2 * d, 3 * d))):
            out[f"{dst}attn1.{part}.weight"] = sd[src + "attn.qkv.weight"][lo:hi]
            out[f"{dst}attn1.{part}.bias"] = sd[src + "attn.qkv.bias"][lo:hi]
        out[dst + "attn1.to_out.0.weight"] = sd[src + "attn.proj.weight"]
        out[dst + "attn1.to_out.0.bias"] = sd[src + "attn.proj.bias"]
        out[dst + "ff.net.0.proj.weight"] = sd[src + "mlp.fc1.weight"]
        out[dst + "ff.net.0.proj.bias"] = sd[src + "mlp.fc1.bias"]
        out[dst + "ff.net.2.weight"] = sd[src + "mlp.fc2.weight"]
        out[dst + "ff.net.2.bias"] = sd[src + "mlp.fc2.bias"]
    return {k: v.detach().cpu().contiguous().clone() for k, v in out.items()}


def _require_diffusers():
    try:
        from diffusers import DiTTransformer2DModel
    except ImportError as e:
        raise ModuleNotFoundError("writing a diffusers model needs diffusers: pip install 'ditmoe[latent]' "
                                  "(or pip install diffusers)", name="diffusers") from e
    return DiTTransformer2DModel


def exact_time_embedding(module) -> Any:
    """Make a loaded DiTTransformer2DModel embed timesteps as DiT does (downscale_freq_shift 0, see
    the module docstring); returns the module. Not saved with it: apply after every load."""
    for block in module.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    return module


def to_diffusers(model, exact_time: bool = True):
    """A diffusers DiTTransformer2DModel (eval mode) holding `model`'s weights.

    exact_time=True applies `exact_time_embedding`, so that it computes `model`'s function;
    False gives the module as `DiTTransformer2DModel.from_pretrained` would load it.
    """
    cls = _require_diffusers()
    module = cls(**diffusers_config(model.config))
    missing, unexpected = module.load_state_dict(to_diffusers_state_dict(model), strict=False)
    if missing or unexpected:  # the mapping covers every persistent tensor; anything else is a diffusers change
        raise RuntimeError(f"diffusers {DIFFUSERS_CLASS} has keys this export does not know: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    dtype = next(model.parameters()).dtype
    module = (module if dtype == torch.float32 else module.to(dtype)).eval()
    return exact_time_embedding(module) if exact_time else module


def save_diffusers(model, folder: str | os.PathLike, process: str | None = None) -> Path:
    """Write a dense DiT as a diffusers DiTTransformer2DModel folder (`save_pretrained`), plus
    ditmoe_config.json (this package's config and process) so that reading it back loses nothing."""
    from .weights_io import atomic_write, check_output_dir

    check_exportable(model.config)
    folder = check_output_dir(folder, "DST")
    module = to_diffusers(model, exact_time=False)
    folder.mkdir(parents=True, exist_ok=True)
    module.save_pretrained(str(folder), safe_serialization=True)
    side = {"model_config": model.config.to_dict(), **({"process": process} if process else {})}
    atomic_write(folder / SIDECAR, lambda tmp: Path(tmp).write_text(json.dumps(side, indent=2) + "\n"))
    return folder


# ------------------------------------------------------------------------------ back
def _read_diffusers_weights(folder: Path) -> dict[str, torch.Tensor]:
    from .weights_io import read_safetensors, torch_load_weights_only

    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        sd: dict[str, torch.Tensor] = {}
        for shard in shards:
            sd.update(read_safetensors(folder / shard)[0])
        return sd
    for name in _DIFFUSERS_WEIGHTS:
        if (folder / name).is_file():
            return read_safetensors(folder / name)[0] if name.endswith(".safetensors") else \
                dict(torch_load_weights_only(folder / name))
    raise FileNotFoundError(f"{folder} has a diffusers config.json but none of {', '.join(_DIFFUSERS_WEIGHTS)}")


def config_from_diffusers(dcfg: Mapping[str, Any], base: ModelConfig | None = None) -> ModelConfig:
    """The ModelConfig of a DiTTransformer2DModel config; refuses what this package's DiT cannot compute."""
    problems = []
    if dcfg.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
        problems.append(f"norm_type {dcfg.get('norm_type')!r} (DiT uses ada_norm_zero)")
    if dcfg.get("activation_fn", "gelu-approximate") != "gelu-approximate":
        problems.append(f"activation_fn {dcfg.get('activation_fn')!r} (DiT uses gelu-approximate)")
    if dcfg.get("norm_elementwise_affine", False):
        problems.append("norm_elementwise_affine true (DiT's LayerNorms have no affine parameters)")
    if not dcfg.get("attention_bias", True):
        problems.append("attention_bias false (DiT's attention has biases)")
    if dcfg.get("num_embeds_ada_norm") is None:
        problems.append("no num_embeds_ada_norm (the number of classes)")
    heads, head_dim = int(dcfg.get("num_attention_heads", 16)), int(dcfg.get("attention_head_dim", 72))
    c_in = int(dcfg.get("in_channels", 4))
    c_out = int(dcfg.get("out_channels") or c_in)
    if c_out not in (c_in, 2 * c_in):
        problems.append(f"out_channels {c_out} with in_channels {c_in} (DiT predicts C or 2 C channels)")
    if problems:
        raise ValueError(f"this {DIFFUSERS_CLASS} is not a DiT ditmoe can load: " + "; ".join(problems))
    eps = float(dcfg.get("norm_eps", 1e-5))
    if eps != _DIT_NORM_EPS:
        warnings.warn(f"the diffusers config has norm_eps {eps:g}; DiT (and this package) normalise the MLP input with "
                      f"eps {_DIT_NORM_EPS:g}, so outputs differ slightly from the diffusers module's", RuntimeWarning)
    kw = dict(input_size=int(dcfg.get("sample_size", 32)), patch_size=int(dcfg.get("patch_size", 2)),
              in_channels=c_in, hidden_size=heads * head_dim, depth=int(dcfg.get("num_layers", 28)), num_heads=heads,
              mlp_ratio=4.0, num_classes=int(dcfg["num_embeds_ada_norm"]), learn_sigma=c_out == 2 * c_in,
              num_experts=0, dense_mlp_type="gelu", attn_layout="qkv")
    if base is not None:  # the sidecar: keep the run-time fields the diffusers config has no place for
        return base.replace(**kw).validate()
    return ModelConfig(name="DiT-from-diffusers", **kw).validate()


def from_diffusers_state_dict(dsd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """DiTTransformer2DModel's state dict -> this package's (the inverse of `to_diffusers_state_dict`).

    Refuses a model whose blocks carry different timestep / label embedders (possible after
    training in diffusers): this package's DiT has one shared embedder.
    """
    from .models.layers import get_2d_sincos_pos_embed

    emb_keys = sorted({k.split("norm1.emb.", 1)[1] for k in dsd if k.startswith("transformer_blocks.0.norm1.emb.")})
    for i in range(1, cfg.depth):
        for k in emb_keys:
            a, b = dsd["transformer_blocks.0.norm1.emb." + k], dsd.get(f"transformer_blocks.{i}.norm1.emb.{k}")
            if b is None or not torch.equal(a, b):
                raise ValueError(f"block {i}'s {k} differs from block 0's: this DiTTransformer2DModel has a separate "
                                 "timestep / label embedder per block, which ditmoe's DiT (one shared embedder, as the "
                                 "original DiT) cannot hold")
    d = cfg.hidden_size
    e = "transformer_blocks.0.norm1.emb."
    sd: dict[str, torch.Tensor] = {
        "x_embedder.proj.weight": dsd["pos_embed.proj.weight"], "x_embedder.proj.bias": dsd["pos_embed.proj.bias"],
        "pos_embed": torch.from_numpy(get_2d_sincos_pos_embed(d, cfg.input_size // cfg.patch_size)).float()[None],
        "t_embedder.mlp.0.weight": dsd[e + "timestep_embedder.linear_1.weight"],
        "t_embedder.mlp.0.bias": dsd[e + "timestep_embedder.linear_1.bias"],
        "t_embedder.mlp.2.weight": dsd[e + "timestep_embedder.linear_2.weight"],
        "t_embedder.mlp.2.bias": dsd[e + "timestep_embedder.linear_2.bias"],
        "y_embedder.embedding_table.weight": dsd[e + "class_embedder.embedding_table.weight"],
        "final_layer.adaLN_modulation.1.weight": dsd["proj_out_1.weight"],
        "final_layer.adaLN_modulation.1.bias": dsd["proj_out_1.bias"],
        "final_layer.linear.weight": dsd["proj_out_2.weight"], "final_layer.linear.bias": dsd["proj_out_2.bias"],
    }
    if sd["y_embedder.embedding_table.weight"].shape[0] != cfg.num_classes + 1:
        raise ValueError(f"the label table has {sd['y_embedder.embedding_table.weight'].shape[0]} rows for "
                         f"{cfg.num_classes} classes; ditmoe's DiT needs the null-label row (num_classes + 1 rows)")
    for i in range(cfg.depth):
        src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        sd[dst + "adaLN_modulation.1.weight"] = dsd[src + "norm1.linear.weight"]
        sd[dst + "adaLN_modulation.1.bias"] = dsd[src + "norm1.linear.bias"]
        sd[dst + "attn.qkv.weight"] = torch.cat([dsd[f"{src}attn1.{p}.weight"] for p in ("to_q", "to_k", "to_v")])
        sd[dst + "attn.qkv.bias"] = torch.cat([dsd[f"{src}attn1.{p}.bias"] for p in ("to_q", "to_k", "to_v")])
        sd[dst + "attn.proj.weight"] = dsd[src + "attn1.to_out.0.weight"]
        sd[dst + "attn.proj.bias"] = dsd[src + "attn1.to_out.0.bias"]
        sd[dst + "mlp.fc1.weight"] = dsd[src + "ff.net.0.proj.weight"]
        sd[dst + "mlp.fc1.bias"] = dsd[src + "ff.net.0.proj.bias"]
        sd[dst + "mlp.fc2.weight"] = dsd[src + "ff.net.2.weight"]
        sd[dst + "mlp.fc2.bias"] = dsd[src + "ff.net.2.bias"]
    return {k: v.contiguous() for k, v in sd.items()}


def from_diffusers(source, with_info: bool = False):
    """A diffusers DiTTransformer2DModel (a folder, or a loaded module) as this package's DiT (eval mode).

    A folder written by `save_diffusers` also restores the config fields and process recorded in
    its ditmoe_config.json (name, timestep_scale, ...). With `with_info`, returns (model, info) as
    `ditmoe.convert.load_model_and_info` does. Needs no diffusers install to read a folder.
    """
    from .weights_io import load_into
    from .registry import create_model

    base, info = None, {"weights": "file"}
    if isinstance(source, torch.nn.Module):
        dcfg, dsd = dict(source.config), source.state_dict()
    else:
        folder = Path(source)
        cfg_path = folder / "config.json"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"{folder} has no config.json: not a diffusers model folder")
        dcfg = json.loads(cfg_path.read_text())
        if dcfg.get("_class_name") != DIFFUSERS_CLASS:
            raise ValueError(f"{cfg_path} describes a {dcfg.get('_class_name')!r}, not a {DIFFUSERS_CLASS}: ditmoe "
                             "converts only diffusers DiT transformers (the transformer/ subfolder of a DiTPipeline)")
        dsd = _read_diffusers_weights(folder)
        if (folder / SIDECAR).is_file():
            side = json.loads((folder / SIDECAR).read_text())
            base = ModelConfig.from_dict(side["model_config"])
            if side.get("process") in ("flow", "ddpm"):
                info["process"] = side["process"]
    cfg = config_from_diffusers(dcfg, base)
    model = create_model(cfg)
    load_into(model, from_diffusers_state_dict(dsd, cfg))
    model = model.eval()
    return (model, info) if with_info else model


__all__ = ["check_exportable", "config_from_diffusers", "diffusers_config", "exact_time_embedding",
           "from_diffusers", "from_diffusers_state_dict", "save_diffusers", "to_diffusers",
           "to_diffusers_state_dict"]
