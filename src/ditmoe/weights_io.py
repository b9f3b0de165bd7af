"""Weight files and state dicts, below every format module (convert, pretrained, export).

Files: safe reading (safetensors, `torch.load(weights_only=True)`) whose refusals say what is
wrong with the file, atomic writing, and output paths checked before any work. State dicts: the
official per-expert layout <-> this package's stacked experts, the `ModelConfig` a state dict's
shapes imply, and a strict load into a model that says what does not fit.

It imports nothing of the package but config and registry, so the modules that read and write
model files (`convert`, `pretrained`, `export`, `train.checkpoint`, ...) all import it and
never each other in a circle.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

from .config import ModelConfig
from .registry import REGISTRY

StateDict = dict[str, torch.Tensor]

_EXPERT_KEY = re.compile(r"^blocks\.(\d+)\.moe\.experts\.(\d+)\.(gate_proj|up_proj|down_proj|fc1|fc2)\.(weight|bias)$")
# Known head counts of the released sizes, by hidden width (qkv layout checkpoints do not reveal it).
_HEADS_BY_WIDTH = {384: 6, 768: 12, 1024: 16, 1152: 16, 1408: 16, 64: 4}


class CheckpointMismatchError(ValueError):
    """A checkpoint whose keys or shapes do not fit the model it is loaded into."""


# ---------------------------------------------------------------------------- reading files
_PASS_INSTEAD = ("pass a model saved by ditmoe (RUN/model_ema.safetensors), a training checkpoint "
                 "(RUN/checkpoints/step_N.pt) or an official DiT-MoE / DiT checkpoint")


def torch_load_weights_only(path: str | os.PathLike, corrupt_hint: str = "") -> Any:
    """`torch.load(weights_only=True)` whose refusals say what is wrong with the file.

    A file holding Python objects other than tensors and plain containers is refused as unsafe
    (unpickling it could run code); a truncated, empty or foreign file is reported as unreadable,
    with `corrupt_hint` appended (e.g. where an older checkpoint is).
    """
    import pickle

    path = Path(path)
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except OSError:
        raise  # permission, I/O: reported as such by the CLI
    except pickle.UnpicklingError as e:
        # torch's weights-only unpickler names the object it refused ("Unsupported global",
        # "Trying to call reduce ..."); random or damaged bytes give "Unsupported operand".
        refusal = re.search(r"WeightsUnpickler error: \s*(.*)", str(e))
        if refusal and not refusal.group(1).startswith("Unsupported operand"):
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
            what = f" (such as {found.group(1)})" if found else ""
            raise ValueError(
                f"{path} holds Python objects other than tensors{what}; ditmoe loads only weights-only "
                "checkpoints, because unpickling arbitrary objects can run code. Where the file comes from a "
                "trusted source, re-save its state dict with torch.save(model.state_dict(), path) "
                "(or save it as safetensors) and pass that file") from e
        raise ValueError(_unreadable_torch(path, e, corrupt_hint)) from e
    except Exception as e:  # RuntimeError (not a zip / truncated), EOFError (empty), IndexError (random bytes)
        raise ValueError(_unreadable_torch(path, e, corrupt_hint)) from e


def _first_sentence(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0].split(". ")[0].rstrip(".") if text else type(e).__name__


def _unreadable_torch(path: Path, e: BaseException, hint: str) -> str:
    size = path.stat().st_size if path.exists() else 0
    why = "it is empty" if size == 0 else f"{type(e).__name__}: {_first_sentence(e)}"
    return (f"{path} is not a readable torch checkpoint ({why}); it may be truncated (an interrupted copy or save) "
            f"or not a checkpoint at all. {hint or 'To sample or convert, ' + _PASS_INSTEAD}.")


def read_safetensors(path: str | os.PathLike) -> tuple[StateDict, dict[str, str]]:
    """All tensors and the metadata of a .safetensors file; an unreadable file gets a clear ValueError."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except OSError:
        raise
    except Exception as e:  # SafetensorError (header too small / large, incomplete) and friends
        why = "it is empty" if path.stat().st_size == 0 else _first_sentence(e)
        raise ValueError(f"{path} is not a readable safetensors file ({why}); it may be truncated (an interrupted "
                         f"copy or save) or not a model at all. To sample or convert, {_PASS_INSTEAD}."
                         ) from e
    return sd, meta


# --------------------------------------------------------------------- config inference
def infer_config(sd: Mapping[str, torch.Tensor], meta_config: Mapping[str, Any] | None = None) -> ModelConfig:
    """Recover the ModelConfig of an official or package state dict from its shapes.

    `meta_config` (the official constructor arguments, e.g. from safetensors metadata) fills in
    what shapes cannot tell: num_heads of the qkv layout, top_k and class dropout.
    """
    meta_config = dict(meta_config or {})
    needed = ("x_embedder.proj.weight", "pos_embed", "y_embedder.embedding_table.weight", "final_layer.linear.weight")
    absent = [k for k in needed if k not in sd]
    if absent or not any(k.startswith("blocks.") for k in sd):
        raise ValueError(f"these weights are not a DiT / DiT-MoE model: {absent or ['blocks.*']} missing "
                         f"(its keys start {sorted(sd)[:4]}); {_PASS_INSTEAD}")
    pw = sd["x_embedder.proj.weight"]
    d, c_in, p = pw.shape[0], pw.shape[1], pw.shape[2]
    t = sd["pos_embed"].shape[1]
    grid = int(round(math.sqrt(t)))
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    num_classes = sd["y_embedder.embedding_table.weight"].shape[0] - 1
    c_out = sd["final_layer.linear.weight"].shape[0] // (p * p)
    layout = "fused_qknorm" if "blocks.0.attn.Wqkv.weight" in sd else "qkv"
    if layout == "fused_qknorm":
        heads = d // sd["blocks.0.attn.q_norm.weight"].shape[0]
    else:
        heads = int(meta_config.get("num_heads") or _HEADS_BY_WIDTH.get(d, max(1, d // 64)))
    moe_idx = sorted({int(k.split(".")[1]) for k in sd if ".moe." in k})
    kw: dict[str, Any] = dict(
        input_size=grid * p, patch_size=p, in_channels=c_in, hidden_size=d, depth=depth, num_heads=heads,
        num_classes=num_classes, learn_sigma=(c_out == 2 * c_in), attn_layout=layout,
        class_dropout_prob=float(meta_config.get("class_dropout_prob", 0.1)),
    )
    if moe_idx:
        b = moe_idx[0]
        if f"blocks.{b}.moe.experts.w_in" in sd:  # this package's stacked layout
            w_in = sd[f"blocks.{b}.moe.experts.w_in"]
            e = w_in.shape[0]
            kind = "gelu" if f"blocks.{b}.moe.experts.b_in" in sd else "swiglu"
            hidden = sd[f"blocks.{b}.moe.experts.w_out"].shape[1]
        else:
            e = 1 + max(int(m.group(2)) for k in sd if (m := _EXPERT_KEY.match(k)) and int(m.group(1)) == b)
            kind = "gelu" if f"blocks.{b}.moe.experts.0.fc1.weight" in sd else "swiglu"
            hidden = sd[f"blocks.{b}.moe.experts.0.{'fc1' if kind == 'gelu' else 'gate_proj'}.weight"].shape[0]
        shared_key = f"blocks.{b}.moe.shared_experts.gate_proj.weight"
        kw.update(
            num_experts=e, expert_type=kind, expert_hidden=hidden,
            shared_hidden=sd[shared_key].shape[0] if shared_key in sd else 0,
            top_k=int(meta_config.get("num_experts_per_tok", meta_config.get("top_k", 2))),
            norm_topk=bool(meta_config.get("norm_topk", False)),
            aux_alpha=float(meta_config.get("aux_alpha", 0.01)),
        )
        if len(moe_idx) < depth:
            kw["moe_placement"] = _placement_of(moe_idx, depth)
    else:
        kw["num_experts"] = 0
    dense_idx = [i for i in range(depth) if i not in moe_idx]
    if dense_idx:
        b = dense_idx[0]
        if f"blocks.{b}.mlp.fc1.weight" in sd:
            kw["dense_mlp_type"] = "gelu"
            hidden = sd[f"blocks.{b}.mlp.fc1.weight"].shape[0]
        else:
            kw["dense_mlp_type"] = "swiglu"
            hidden = sd[f"blocks.{b}.mlp.gate_proj.weight"].shape[0]
        kw["mlp_ratio"] = hidden / d
    for key in ("timestep_scale", "name"):
        if key in meta_config:
            kw[key] = meta_config[key]
    return ModelConfig(**kw).validate()


def _placement_of(moe_idx: list[int], depth: int) -> str:
    for placement in ("every_other", "deep_half", "shallow_half"):
        cfg = ModelConfig(depth=depth, moe_placement=placement, num_experts=2, top_k=1)
        if [i for i, m in enumerate(cfg.moe_blocks()) if m] == moe_idx:
            return placement
    raise ValueError(f"MoE layers at blocks {moe_idx} match no known placement")


def matching_model_names(cfg: ModelConfig) -> list[str]:
    """Registry names whose architecture equals `cfg` (ignoring run-time knobs)."""
    keys = ("input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads", "num_experts",
            "attn_layout", "learn_sigma", "num_classes")
    out = []
    for name, ref in REGISTRY.items():
        if all(getattr(ref, k) == getattr(cfg, k) for k in keys if k not in ("input_size", "num_classes", "in_channels")):
            out.append(name)
    return out


# ----------------------------------------------------------- official <-> package layout
def official_to_package(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Stack per-expert Linear weights into `experts.w_in / w_out` (and biases for GELU experts)."""
    out: StateDict = {}
    experts: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
    for k, v in sd.items():
        m = _EXPERT_KEY.match(k)
        if m:
            experts.setdefault(int(m.group(1)), {}).setdefault(int(m.group(2)), {})[f"{m.group(3)}.{m.group(4)}"] = v
        else:
            out[k] = v
    for b, per_expert in experts.items():
        ids = sorted(per_expert)
        if ids != list(range(len(ids))):
            raise CheckpointMismatchError(f"block {b}: expert indices {ids} are not contiguous from 0")
        prefix = f"blocks.{b}.moe.experts."
        if "fc1.weight" in per_expert[0]:
            out[prefix + "w_in"] = torch.stack([per_expert[e]["fc1.weight"].t() for e in ids])
            out[prefix + "b_in"] = torch.stack([per_expert[e]["fc1.bias"] for e in ids])
            out[prefix + "w_out"] = torch.stack([per_expert[e]["fc2.weight"].t() for e in ids])
            out[prefix + "b_out"] = torch.stack([per_expert[e]["fc2.bias"] for e in ids])
        else:
            out[prefix + "w_in"] = torch.stack(
                [torch.cat([per_expert[e]["gate_proj.weight"], per_expert[e]["up_proj.weight"]], 0).t() for e in ids])
            out[prefix + "w_out"] = torch.stack([per_expert[e]["down_proj.weight"].t() for e in ids])
    return {k: v.contiguous() for k, v in out.items()}


def package_to_official(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Inverse of `official_to_package`: one Linear trio (or fc1/fc2 pair) per expert."""
    out: StateDict = {}
    for k, v in sd.items():
        m = re.match(r"^(blocks\.\d+\.moe\.experts\.)(w_in|w_out|b_in|b_out)$", k)
        if not m:
            out[k] = v.contiguous()
            continue
        prefix, what = m.group(1), m.group(2)
        gelu = (prefix + "b_in") in sd
        for e in range(v.shape[0]):
            if what == "w_in" and not gelu:
                gate, up = v[e].t().chunk(2, dim=0)
                out[f"{prefix}{e}.gate_proj.weight"] = gate.contiguous()
                out[f"{prefix}{e}.up_proj.weight"] = up.contiguous()
            elif what == "w_in":
                out[f"{prefix}{e}.fc1.weight"] = v[e].t().contiguous()
            elif what == "w_out":
                out[f"{prefix}{e}.{'fc2' if gelu else 'down_proj'}.weight"] = v[e].t().contiguous()
            elif what == "b_in":
                out[f"{prefix}{e}.fc1.bias"] = v[e].contiguous()
            else:
                out[f"{prefix}{e}.fc2.bias"] = v[e].contiguous()
    return out


# --------------------------------------------------------------------------- loading
def load_into(model: torch.nn.Module, sd: Mapping[str, torch.Tensor]) -> None:
    """load_state_dict with a readable diagnosis instead of a size-mismatch trace."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shape_bad = [(k, tuple(sd[k].shape), tuple(expected[k].shape)) for k in expected
                 if k in sd and sd[k].shape != expected[k].shape]
    if missing or unexpected or shape_bad:
        lines = [f"checkpoint does not fit model {getattr(model, 'config', None) and model.config.name!r}:"]
        for k, got, want in shape_bad[:5]:
            lines.append(f"  {k}: checkpoint has shape {got}, model expects {want}")
        if missing:
            lines.append(f"  missing from checkpoint ({len(missing)}): {missing[:5]}")
        if unexpected:
            lines.append(f"  not in model ({len(unexpected)}): {unexpected[:5]}")
        try:
            fitting = infer_config(sd)
            names = matching_model_names(fitting)
            lines.append(
                "  the checkpoint looks like " + (f"model {names[0]!r}" if names else "a custom model")
                + f" (depth {fitting.depth}, hidden {fitting.hidden_size}, experts {fitting.num_experts},"
                f" patch {fitting.patch_size}, input {fitting.input_size}, classes {fitting.num_classes});"
                " load it with that name or with load_official(path), which reads the config from the weights"
            )
        except Exception:  # the diagnosis is best effort; the mismatch itself is the error
            pass
        raise CheckpointMismatchError("\n".join(lines))
    model.load_state_dict(dict(sd), strict=True)


# ---------------------------------------------------------------------------- writing files
def _umask() -> int:
    try:  # Linux reports it without changing it
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _is_torch_write_failure(e: BaseException) -> bool:
    """torch.save's zip writer reports a failed write (a full disk) as a RuntimeError; errors that
    already explain themselves (and only quote torch's) are left as they are."""
    text = str(e).lstrip()
    return isinstance(e, RuntimeError) and text.startswith(("[enforce fail at inline_container",
                                                            "PytorchStreamWriter failed writing"))


def disk_write_error(path: str | os.PathLike, e: BaseException) -> OSError:
    """An OSError naming `path` for a write that failed inside a library (torch's zip writer)."""
    import errno
    import shutil

    path = Path(path)
    try:
        free = shutil.disk_usage(path.parent if path.parent.exists() else ".").free
    except OSError:
        free = None
    full = free is not None and free < 64 * 2**20
    detail = f"{free / 2**20:.0f} MiB free there" if free is not None else "free space unknown"
    first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    return OSError(errno.ENOSPC if full else errno.EIO, f"torch could not write the file, {detail}: {first}",
                   str(path) if str(path) not in ("", ".") else None)


def atomic_write(path: str | os.PathLike, write_fn) -> None:
    """Write through a temporary file in the same folder, fsync, then rename over `path`.

    A crash or a full disk mid-write leaves the previous file untouched. The file gets the mode
    a plain open() would give it: an existing file's mode, else 0o666 less the umask.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    os.close(fd)
    try:
        try:
            write_fn(tmp)
        except RuntimeError as e:
            if _is_torch_write_failure(e):
                raise disk_write_error(path, e) from e
            raise
        os.chmod(tmp, mode)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    """`data` as indented JSON through `atomic_write`."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2)))


def _probe_write(folder: Path, flag: str) -> None:
    """Create and remove a file in `folder`, so a read-only folder is found before any work."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".ditmoe-write-probe.", dir=str(folder))
    except OSError as e:
        raise ValueError(f"{flag} {folder}: cannot write there ({e.strerror or e}); choose a writable folder") from e
    os.close(fd)
    os.unlink(probe)


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output_dir(path: str | os.PathLike, flag: str = "--out") -> Path:
    """Check before any work that `path` can be an output folder: not a file, and writable (in
    its nearest existing ancestor when it does not exist yet; nothing is created here)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file, not a folder; pass a folder (created if missing) "
                         "for the outputs")
    base = _existing_ancestor(path)
    if not base.is_dir():
        raise ValueError(f"{flag} {path}: {base} is a file, so the folder cannot be created there; pass another folder")
    _probe_write(base, flag)
    return path


def check_output_file(path: str | os.PathLike, flag: str = "--out", suffix: str | None = None) -> Path:
    """Check before any work that `path` can be written as a file: not a folder, its folder
    writable (or creatable), and ending in `suffix` when given."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; pass a file path" + (f" ending in {suffix}" if suffix else ""))
    if suffix and path.suffix != suffix:
        raise ValueError(f"{flag} {path} must end in {suffix}")
    check_output_dir(path.parent, f"{flag} {path}: its folder")
    return path
