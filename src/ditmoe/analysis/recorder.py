"""Count which experts the routers pick while a model samples (paper Figures 5 to 7).

`RoutingRecorder` installs an observer on every MoE layer for the duration of a ``with`` block
and folds each routing decision into fixed-size count tables, so memory does not grow with the
number of images or steps. The caller supplies the context of every model call::

    with RoutingRecorder(model, num_steps=250) as rec:
        rec.set_labels(torch.cat([y, y_null]))     # labels of the full batch; == num_classes: uncond
        for i, t in enumerate(timesteps):
            rec.set_step(i)                        # or pass rec.on_step as the sampler callback
            model(x, t, labels)
    res = rec.results()                            # RoutingResults (numpy), .save("routing.npz")

Conventions
- Branch 0 is "cond", branch 1 is "uncond": a token is unconditional when its image's label
  equals ``num_classes`` (the null label of classifier-free guidance).
- Counts are over (token, expert) pairs: a token that goes to k experts adds k counts. Top-k
  routers give every token exactly k pairs; other routers (expert choice, race) any number, zero
  included. ``tokens`` counts tokens and ``unrouted`` the tokens with no routed expert, so for
  top-k ``step_expert[l, b, s].sum() == k * tokens routed at step s``.
- Step index s is the order of the sampler's model evaluations, 0 = first = noisiest step.
- Tables stay on the device the routing ran on (no host synchronisation inside sampling) and are
  copied to numpy by `results()`.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

BRANCHES = ("cond", "uncond")

# Joint [step, position, expert] tables are kept when all of them together stay under this size.
_JOINT_AUTO_BYTES = 512 * 2**20


@dataclasses.dataclass
class RoutingResults:
    """Routing counts of L MoE layers (numpy; axis 1 of the per-branch tables is the branch).

    layers            (L,)              block index of each MoE layer
    step_expert       (L, 2, S, E)      int64 slot counts by sampling step
    position_expert   (L, 2, T, E)      int64 slot counts by token position (row-major patch grid)
    class_expert      (L, 2, C+1, E)    int64 slot counts by label; row C is the null label
    coselect          (L, 2, E, E)      int64; [i, j] (i != j): tokens that picked both i and j,
                                        [i, i]: tokens that picked i (its load)
    gate_sum          (L, 2, E)         float64 summed gate weight given to each expert
    tokens            (L, 2)            int64 number of tokens routed
    step_position_expert (L, 2, S, T, E) int64 joint table, or None when not recorded
    unrouted          (L, 2)            int64 tokens that went to no routed expert (None in files
                                        written before it existed)
    top_k is the layer's nominal k (exact pairs per token for top-k routers, the mean for the
    capacity- and threshold-based ones only on average).
    """

    layers: np.ndarray
    num_experts: int
    top_k: int
    num_classes: int
    num_steps: int
    num_positions: int
    step_expert: np.ndarray
    position_expert: np.ndarray
    class_expert: np.ndarray
    coselect: np.ndarray
    gate_sum: np.ndarray
    tokens: np.ndarray
    step_position_expert: np.ndarray | None = None
    unrouted: np.ndarray | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    _ARRAYS = ("layers", "step_expert", "position_expert", "class_expert", "coselect", "gate_sum",
               "tokens", "step_position_expert", "unrouted")
    _SCALARS = ("num_experts", "top_k", "num_classes", "num_steps", "num_positions")

    @property
    def num_layers(self) -> int:
        return int(len(self.layers))

    @property
    def grid_size(self) -> int:
        """Side of the square patch grid (T = side * side)."""
        return int(round(self.num_positions ** 0.5))

    def branch_index(self, branch: str) -> int:
        if branch not in BRANCHES:
            raise ValueError(f"branch must be one of {BRANCHES}, got {branch!r}")
        return BRANCHES.index(branch)

    def save(self, path: str | Path) -> Path:
        """Write every table to one compressed .npz file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {name: getattr(self, name) for name in self._ARRAYS if getattr(self, name) is not None}
        arrays.update({name: np.asarray(getattr(self, name), dtype=np.int64) for name in self._SCALARS})
        import json

        arrays["meta_json"] = np.asarray(json.dumps(self.meta))
        np.savez_compressed(path, **arrays)
        return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")

    @classmethod
    def load(cls, path: str | Path) -> "RoutingResults":
        import json

        with np.load(Path(path), allow_pickle=False) as f:
            kw: dict[str, Any] = {name: (f[name] if name in f.files else None) for name in cls._ARRAYS}
            kw.update({name: int(f[name]) for name in cls._SCALARS})
            kw["meta"] = json.loads(str(f["meta_json"])) if "meta_json" in f.files else {}
        return cls(**kw)

    @classmethod
    def merge(cls, parts: Sequence["RoutingResults"]) -> "RoutingResults":
        """Sum the counts of several recordings of the same model (e.g. one per process)."""
        if not parts:
            raise ValueError("nothing to merge")
        first = parts[0]
        for p in parts[1:]:
            for name in cls._SCALARS:
                if getattr(p, name) != getattr(first, name):
                    raise ValueError(f"cannot merge results with different {name}")
            if not np.array_equal(p.layers, first.layers):
                raise ValueError("cannot merge results of different layers")
        kw: dict[str, Any] = {name: getattr(first, name) for name in cls._SCALARS}
        kw["layers"] = first.layers.copy()
        for name in cls._ARRAYS[1:]:
            vals = [getattr(p, name) for p in parts]
            kw[name] = None if any(v is None for v in vals) else functools.reduce(np.add, vals)
        kw["meta"] = dict(first.meta)
        return cls(**kw)


class _LayerCounts:
    """Count tables of one MoE layer, allocated on the first routing call (T and device known)."""

    def __init__(self, num_experts: int, top_k: int, num_positions: int, num_steps: int,
                 num_classes: int, joint: bool, device: torch.device):
        e, t, s, c = num_experts, num_positions, num_steps, num_classes
        z = functools.partial(torch.zeros, dtype=torch.int64, device=device)
        self.num_experts, self.top_k, self.num_positions = e, top_k, t
        self.step_expert = z(2, s, e)
        self.position_expert = z(2, t, e)
        self.class_expert = z(2, c + 1, e)
        self.coselect = z(2, e, e)
        self.gate_sum = torch.zeros(2 * e, dtype=torch.float64, device=device)
        self.step_position_expert = z(2, s, t, e) if joint else None
        self.tokens = z(2)
        self.unrouted = z(2)

    def tensors(self) -> dict[str, torch.Tensor | None]:
        return {"step_expert": self.step_expert, "position_expert": self.position_expert,
                "class_expert": self.class_expert, "coselect": self.coselect,
                "gate_sum": self.gate_sum, "step_position_expert": self.step_position_expert,
                "tokens": self.tokens, "unrouted": self.unrouted}


class RoutingRecorder:
    """Context manager that counts every MoE layer's routing pairs (see module docstring).

    model: anything with ``moe_layers() -> [(block_index, moe)]`` (moe has ``observer``,
    ``num_experts`` and ``top_k``) and, unless given here, ``num_classes``.
    num_steps: number of distinct step indices the sampler will report (0 .. num_steps-1).
    joint: keep the [step, position, expert] table: True, False or "auto" (kept when all layers'
    joint tables together take at most 512 MiB).
    """

    def __init__(self, model: Any, num_steps: int, num_classes: int | None = None,
                 joint: bool | str = "auto"):
        if num_steps < 1:
            raise ValueError("num_steps must be >= 1")
        if num_classes is None:
            num_classes = getattr(model, "num_classes", None)
            if num_classes is None:
                raise ValueError("num_classes not given and the model has no `num_classes`")
        if joint not in (True, False, "auto"):
            raise ValueError("joint must be True, False or 'auto'")
        self.model = model
        self.num_steps = int(num_steps)
        self.num_classes = int(num_classes)
        self.joint = joint
        self._moes: list[tuple[int, Any]] = list(model.moe_layers())
        if not self._moes:
            raise ValueError("the model has no MoE layers")
        self._counts: list[_LayerCounts | None] = [None] * len(self._moes)
        self._installed = False
        self._step: int | None = None
        self._labels: torch.Tensor | None = None
        self._keys: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.calls = 0  # number of (layer, batch) routing calls observed

    # ------------------------------------------------------------------ context
    def __enter__(self) -> "RoutingRecorder":
        self.install()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def install(self) -> None:
        """Install the observers (what ``__enter__`` does)."""
        if self._installed:
            raise RuntimeError("RoutingRecorder is already installed")
        busy = [i for i, moe in self._moes if getattr(moe, "observer", None) is not None]
        if busy:
            raise RuntimeError(f"MoE layers {busy} already have an observer; recorders do not nest")
        for slot, (_, moe) in enumerate(self._moes):
            moe.observer = functools.partial(self._observe, slot)
        self._installed = True

    def remove(self) -> None:
        """Remove this recorder's observers (what ``__exit__`` does); safe to call twice."""
        for _, moe in self._moes:
            obs = getattr(moe, "observer", None)
            if isinstance(obs, functools.partial) and getattr(obs.func, "__self__", None) is self:
                moe.observer = None
        self._installed = False

    # ------------------------------------------------------------------ context of each call
    def set_step(self, step_index: int) -> None:
        """Sampling step of the next model calls (0 = first, noisiest)."""
        step_index = int(step_index)
        if not 0 <= step_index < self.num_steps:
            raise ValueError(f"step_index {step_index} outside [0, {self.num_steps})")
        self._step = step_index

    def on_step(self, step_index: int, t: Any = None) -> None:
        """Sampler callback signature ``on_step(step_index, t)``; same as `set_step`."""
        self.set_step(step_index)

    def set_labels(self, labels: torch.Tensor | Sequence[int]) -> None:
        """Labels of the full batch of the next model calls (== num_classes: unconditional)."""
        labels = torch.as_tensor(labels).reshape(-1)
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError("labels must be integers")
        if labels.device.type == "cpu" and labels.numel():  # a device check would sync
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi > self.num_classes:
                raise ValueError(f"labels must lie in [0, {self.num_classes}], got [{lo}, {hi}]")
        self._labels = labels.long()
        self._keys.clear()

    # ------------------------------------------------------------------ counting
    def _alloc(self, slot: int, moe: Any, n_pos: int, k: int, device: torch.device) -> _LayerCounts:
        e = int(getattr(moe, "num_experts"))
        joint = self.joint
        if joint == "auto":
            total = len(self._moes) * 2 * self.num_steps * n_pos * e * 8
            joint = total <= _JOINT_AUTO_BYTES
        counts = _LayerCounts(e, k, n_pos, self.num_steps, self.num_classes, bool(joint), device)
        self._counts[slot] = counts
        return counts

    def _token_keys(self, n: int, n_pos: int, e: int, device: torch.device):
        """Per-image base keys of the flattened count tables, shared by all layers of a call."""
        key = (n, n_pos, e, device)
        cached = self._keys.get(key)
        if cached is not None:
            return cached
        if self._labels is None:
            raise RuntimeError("call set_labels(labels) before the model runs inside a RoutingRecorder")
        if self._labels.numel() != n:
            raise ValueError(f"set_labels got {self._labels.numel()} labels but the batch has {n} images")
        labels = self._labels.to(device, non_blocking=True)
        branch = (labels == self.num_classes).long()  # (N,) 0 cond, 1 uncond
        pos = torch.arange(n_pos, device=device)
        pos_base = ((branch[:, None] * n_pos + pos[None, :]) * e)[:, :, None]  # (N, T, 1)
        cls_base = ((branch * (self.num_classes + 1) + labels) * e)[:, None, None]  # (N, 1, 1)
        br_base = (branch * e)[:, None, None]  # (N, 1, 1)
        self._keys[key] = (pos_base, cls_base, br_base)
        return self._keys[key]

    @torch.no_grad()
    def _observe(self, slot: int, moe: Any, a: Any, n: int) -> None:
        """One routing decision: `a` an Assignment over the n * T tokens of n images (image-major)."""
        if self._step is None:
            raise RuntimeError("call set_step(step_index) before the model runs inside a RoutingRecorder")
        n_tok = int(a.probs.shape[0])
        n_pos, k = n_tok // n, int(getattr(moe, "top_k", a.k or 1))
        device = a.expert.device
        counts = self._counts[slot]
        if counts is None:
            counts = self._alloc(slot, moe, n_pos, k, device)
        elif counts.num_positions != n_pos:
            raise ValueError(f"layer {self._moes[slot][0]}: routing shape (T={n_pos}) changed "
                             f"from (T={counts.num_positions})")
        e, s, c1 = counts.num_experts, self._step, self.num_classes + 1
        pos_base, cls_base, br_base = self._token_keys(n, n_pos, e, device)
        token, expert = a.token.long(), a.expert.long()
        image = torch.div(token, n_pos, rounding_mode="floor")

        # [branch, position, expert]: one bincount; the step table is its sum over positions.
        pos_key = pos_base.reshape(-1).index_select(0, token) + expert
        pos_tab = torch.bincount(pos_key, minlength=2 * n_pos * e).view(2, n_pos, e)
        counts.position_expert += pos_tab
        counts.step_expert[:, s] += pos_tab.sum(1)
        if counts.step_position_expert is not None:
            counts.step_position_expert[:, s] += pos_tab
        cls_tab = torch.bincount(cls_base.reshape(-1).index_select(0, image) + expert, minlength=2 * c1 * e)
        counts.class_expert += cls_tab.view(2, c1, e)
        # Which experts each token went to, (n T, E) 0/1; per branch M^T M counts the tokens that
        # picked both i and j, and on the diagonal those that picked i (a token's experts are distinct).
        branch_tok = torch.div(br_base.reshape(-1), e, rounding_mode="floor").repeat_interleave(n_pos)  # (n T,)
        picked = torch.zeros(n_tok, e, dtype=torch.float64, device=device)
        picked.index_put_((token, expert), torch.ones_like(token, dtype=torch.float64))
        for b in range(2):
            rows = picked * (branch_tok == b).unsqueeze(1)
            counts.coselect[b] += (rows.t() @ picked).round().long()
        counts.tokens += torch.bincount(branch_tok, minlength=2)
        counts.unrouted += torch.bincount(branch_tok, weights=(picked.sum(1) == 0).double(), minlength=2).long()
        # index_put_ with accumulate is deterministic on CUDA, unlike a float bincount.
        counts.gate_sum.index_put_((br_base.reshape(-1).index_select(0, image) + expert,),
                                   a.weight.reshape(-1).to(torch.float64), accumulate=True)
        self.calls += 1

    # ------------------------------------------------------------------ output
    def count_tensors(self) -> list[dict[str, torch.Tensor | None]]:
        """The live count tensors of each layer (empty dict for a layer that has not routed yet)."""
        return [c.tensors() if c is not None else {} for c in self._counts]

    def results(self) -> RoutingResults:
        """Copy the counts to numpy. Layers that never routed must not exist: run the model first."""
        missing = [self._moes[i][0] for i, c in enumerate(self._counts) if c is None]
        if missing:
            raise RuntimeError(f"MoE layers {missing} recorded nothing; run the model inside the recorder")
        cs = [c for c in self._counts if c is not None]
        e, k, t = cs[0].num_experts, cs[0].top_k, cs[0].num_positions
        if any((c.num_experts, c.num_positions) != (e, t) for c in cs):
            raise ValueError("MoE layers differ in experts, top-k or tokens; cannot stack")

        def stack(name: str) -> np.ndarray:
            return np.stack([getattr(c, name).cpu().numpy() for c in cs])

        joint = None
        if all(c.step_position_expert is not None for c in cs):
            joint = stack("step_position_expert")
        step_expert = stack("step_expert")
        return RoutingResults(
            layers=np.asarray([i for i, _ in self._moes], dtype=np.int64),
            num_experts=e, top_k=k, num_classes=self.num_classes, num_steps=self.num_steps,
            num_positions=t, step_expert=step_expert, position_expert=stack("position_expert"),
            class_expert=stack("class_expert"), coselect=stack("coselect"),
            gate_sum=stack("gate_sum").reshape(len(cs), 2, e), tokens=stack("tokens").astype(np.int64),
            step_position_expert=joint, unrouted=stack("unrouted").astype(np.int64), meta={"calls": self.calls},
        )

    def save(self, path: str | Path) -> Path:
        """`results().save(path)`."""
        return self.results().save(path)

    def reset(self) -> None:
        """Zero every table (keeps the observers installed)."""
        for c in self._counts:
            if c is not None:
                for v in c.tensors().values():
                    if v is not None:
                        v.zero_()
        self.calls = 0

