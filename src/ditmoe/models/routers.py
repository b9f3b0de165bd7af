"""Routing rules: each maps token features to an `Assignment` of (token, expert, weight) pairs.

One class per rule, chosen by `ModelConfig.router` (`build_router`); docs/routing.md gives the
formulas, sources and knobs of each:

- `topk_softmax` (`TopKRouter`): DiT-MoE's softmax top-k per token with the Eq. 5 balance loss.
- `topk_bias` (`BiasTopKRouter`): auxiliary-loss-free balancing (DeepSeek-V3): select by score +
  a per-expert bias, weight by the unbiased score; the bias moves after each optimizer step.
- `expert_choice` (`ExpertChoiceRouter`): EC-DiT; within each image every expert takes its top-C
  tokens; the same at inference.
- `race` (`RaceRouter`): Expert Race; one top-K over all (token, expert) scores of the batch in
  training, a threshold learned from the training cut-off at inference.
- `token_pool` (`TokenPoolRouter`): DiffMoE; expert choice over the batch's token pool in
  training, a capacity predictor with per-expert thresholds at inference.
- `prototype` (`PrototypeRouter`): ProMoE; null-class tokens to the last (unconditional) expert,
  the others by cosine similarity to learnable prototypes, with a routing contrastive loss.

Stateful rules keep their state in buffers (in checkpoints, never seen by the optimizer) and
accumulate the statistics of every training forward in non-persistent buffers; after each
optimizer step the trainer calls `update_routers(model, reduce)`, where `reduce` sums a tensor
over the data-parallel processes (supplied from outside: this package never imports
torch.distributed). Plain PyTorch, like the rest of `ditmoe.models`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ROUTER_SCORES as SCORE_FUNCS
from ..config import ROUTERS

# The score function "auto" stands for, per router.
DEFAULT_SCORE = {"topk_softmax": "softmax", "topk_bias": "sigmoid", "expert_choice": "softmax", "race": "sigmoid",
                 "token_pool": "softmax"}
# The balance-loss weight aux_alpha=None stands for, per router.
DEFAULT_AUX_ALPHA = {"topk_softmax": 0.01, "topk_bias": 0.0, "expert_choice": 0.0, "race": 0.0, "token_pool": 0.0,
                     "prototype": 0.0}

Reduce = Callable[[torch.Tensor], torch.Tensor]  # sums a tensor over the data-parallel processes


class Assignment(NamedTuple):
    """Which experts each of T tokens goes to, as P flat (token, expert, weight) pairs.

    A token may have any number of pairs (zero included); the dispatcher needs nothing more.
    Top-k routing is the special case `k` > 0: exactly k pairs per token, numbered slot-major
    (pair s * T + t is token t's s-th choice), so `expert_ids` / `weights` view them as (T, k).
    A named tuple, so module hooks that walk outputs (DeepSpeed ZeRO-3's) see its tensors.
    """

    token: torch.Tensor  # (P,) int64
    expert: torch.Tensor  # (P,) int64
    weight: torch.Tensor  # (P,) the pair's gate weight (fp32)
    probs: torch.Tensor  # (T, E) the router's probabilities (fp32), for the balance loss
    k: int = 0  # > 0: top-k, slot-major
    extra_loss: torch.Tensor | None = None  # a rule's own training loss (token_pool's predictor), added to the aux loss

    @classmethod
    def top_k(cls, expert_ids: torch.Tensor, weights: torch.Tensor, probs: torch.Tensor) -> "Assignment":
        """From top-k choices expert_ids (T, k) and their weights (T, k)."""
        t, k = expert_ids.shape
        token = torch.arange(t, device=expert_ids.device).repeat(k)
        return cls(token, expert_ids.t().reshape(-1), weights.t().reshape(-1), probs, k)

    @property
    def num_tokens(self) -> int:
        return self.probs.shape[0]

    @property
    def num_experts(self) -> int:
        return self.probs.shape[1]

    @property
    def expert_ids(self) -> torch.Tensor:
        """(T, k) chosen experts of a top-k assignment."""
        return self.expert.view(self.k, -1).t()

    @property
    def weights(self) -> torch.Tensor:
        """(T, k) gate weights of a top-k assignment."""
        return self.weight.view(self.k, -1).t()

    def pairs_per_token(self) -> torch.Tensor:
        """(T,) int64 number of experts each token goes to."""
        return torch.zeros(self.num_tokens, dtype=torch.long, device=self.token.device).scatter_add_(
            0, self.token, torch.ones_like(self.token))


def expert_counts(expert_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Pairs per expert (E,) int64, on the device.

    A scatter-add rather than `torch.bincount`, whose data-dependent output size breaks the
    torch.compile graph at every MoE layer.
    """
    flat = expert_ids.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def balance_loss(probs: torch.Tensor, expert_ids: torch.Tensor, num_experts: int, alpha: float) -> torch.Tensor:
    """Expert-level balance loss (paper Eq. 5) over the T tokens of `probs` (T, E).

    L = alpha * sum_i f_i * P_i with f_i = E / P * #pairs that chose i (P = k T for top-k) and
    P_i = mean_t p_t,i. `expert_ids` holds the chosen experts, any shape ((T, k) or (P,)).
    """
    counts = expert_counts(expert_ids, num_experts).to(probs.dtype)
    f = counts * (num_experts / max(expert_ids.numel(), 1))
    return alpha * (f * probs.mean(dim=0)).sum()


BalanceLoss = Callable[[torch.Tensor, torch.Tensor, int, float], torch.Tensor]


def router_similarity_loss(probs: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Router-similarity loss (Race-DiT): Eq. 5's balance loss extended from experts to pairs of experts.

    probs (T, E): softmax of the router logits; selected (T, E): 0/1, which (token, expert) pairs
    were chosen. With C = selected^T selected (how often experts i and j were chosen for the same
    token; C_ii = expert i's load) and Q = probs^T probs / T (the mean of p_i p_j over tokens),
    L = 1/E * sum_ij F_ij Q_ij, where F is C normalised to mean 1 on the diagonal and to mean 1 off
    it. The diagonal is the balance loss on p_i^2; the off-diagonal part lowers the joint
    probability of pairs that are chosen together more often than the others, so experts do not
    collapse into fixed teams. With every pair equally frequent and p uniform, L = 1/E^2 + (E-1)/E^2 = 1/E.
    """
    t, e = probs.shape
    co = selected.t() @ selected  # (E, E)
    q = probs.t() @ probs / max(t, 1)
    diag = torch.eye(e, dtype=torch.bool, device=probs.device)
    on = co.diagonal().sum().clamp_min(1.0)
    off = (co.sum() - co.diagonal().sum()).clamp_min(1.0)
    f = torch.where(diag, co * (e / on), co * (max(e * e - e, 1) / off))
    return (f * q).sum() / e


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (T, D) @ weight (E, D)^T in fp32 (float64 for float64 inputs), even under autocast: bf16
    logits flip near-tied choices, and the router is a negligible share of the FLOPs."""
    dt = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.to(dt), weight.to(dt))


def scores_of(logits: torch.Tensor, score: str) -> torch.Tensor:
    return logits.softmax(dim=-1) if score == "softmax" else torch.sigmoid(logits)


class Router(nn.Module):
    """The router interface: `forward(x (T, D), cond=None) -> Assignment`, `balance_loss(a)`
    (scalar fp32), `counts(a)` (pairs per expert). `cond` carries optional conditioning (labels,
    time) for routing rules that use it; the top-k router ignores it.

    `route(x (N, T, D), cond)` is what the MoE layer calls: by default the tokens of all images
    flattened into `forward`; rules that need the image structure override it.
    `update_after_step(reduce)` runs after each optimizer step (stateful rules); `statistics()`
    gives a few cheap numbers for the training log.
    """

    num_experts: int

    def __init__(self, num_experts: int, dim: int | None = None):
        """`dim` given: the rule scores tokens with a gate `weight` (E, D), a linear map without
        bias initialised as nn.Linear's (as the official gate). `loss_fn` computes the balance loss
        from (probs, expert ids, E, alpha); `ditmoe.parallel.attach_global_balance` replaces it."""
        super().__init__()
        self.num_experts = num_experts
        if dim is not None:
            self.weight = nn.Parameter(torch.empty(num_experts, dim))
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.loss_fn: BalanceLoss = balance_loss

    def route(self, x: torch.Tensor, cond: Any = None) -> Assignment:
        return self(x.reshape(-1, x.shape[-1]), cond)

    def balance_loss(self, a: Assignment) -> torch.Tensor:
        """The layer's aux loss: the Eq. 5 balance loss weighted by `aux_alpha` (through `loss_fn`,
        which `ditmoe.parallel.attach_global_balance` may replace), plus the rule's own loss."""
        alpha = getattr(self, "aux_alpha", 0.0)
        loss = a.probs.new_zeros(()) if alpha <= 0 else self.loss_fn(a.probs, a.expert, self.num_experts, alpha)
        return loss if a.extra_loss is None else loss + a.extra_loss.to(loss.dtype)

    def counts(self, a: Assignment) -> torch.Tensor:
        return expert_counts(a.expert, self.num_experts)

    @torch.no_grad()
    def update_after_step(self, reduce: Reduce | None = None) -> None:
        """Move the rule's state with what the training forwards since the last call saw."""

    def statistics(self) -> dict[str, float]:
        return {}


class TopKRouter(Router):
    """Linear D -> E (no bias), softmax, top-k. Official name: `moe.gate`, parameter `weight` (E, D)."""

    def __init__(self, dim: int, num_experts: int, top_k: int, norm_topk: bool, aux_alpha: float = 0.01):
        super().__init__(num_experts, dim)
        self.top_k, self.norm_topk, self.aux_alpha = top_k, norm_topk, aux_alpha

    def forward(self, x: torch.Tensor, cond: Any = None) -> Assignment:
        probs = router_logits(x, self.weight).softmax(dim=-1)
        topk_w, topk_idx = torch.topk(probs, k=self.top_k, dim=-1, sorted=False)
        if self.norm_topk and self.top_k > 1:
            topk_w = topk_w / (topk_w.sum(dim=-1, keepdim=True) + 1e-20)
        return Assignment.top_k(topk_idx, topk_w, probs)


class BiasTopKRouter(TopKRouter):
    """Auxiliary-loss-free balancing (DeepSeek-V3, arXiv 2412.19437).

    s = softmax or sigmoid of the logits; experts selected by top-k of s + bias, weighted by the
    unbiased s of the selected experts (optionally renormalised over the k, then times
    `route_scale`). `bias` (E,) is a persistent buffer; every training forward adds its pairs per
    expert to `pending` and `update_after_step` moves the bias by
    u * sign(mean_e load - load_e), then subtracts its mean. Only the signs of the load
    differences matter, so counting a forward twice (gradient checkpointing recomputes it) changes
    nothing.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, norm_topk: bool, aux_alpha: float = 0.0,
                 score: str = "sigmoid", update_rate: float = 1e-3, route_scale: float = 1.0):
        super().__init__(dim, num_experts, top_k, norm_topk, aux_alpha)
        self.score, self.update_rate, self.route_scale = score, update_rate, route_scale
        self.register_buffer("bias", torch.zeros(num_experts, dtype=torch.float32))
        self.register_buffer("pending", torch.zeros(num_experts, dtype=torch.float64), persistent=False)

    def forward(self, x: torch.Tensor, cond: Any = None) -> Assignment:
        s = scores_of(router_logits(x, self.weight), self.score)
        idx = torch.topk(s.detach() + self.bias, k=self.top_k, dim=-1, sorted=False).indices
        w = s.gather(1, idx)
        if self.norm_topk and self.top_k > 1:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        if self.route_scale != 1.0:
            w = w * self.route_scale
        # For the (optional) balance loss: probabilities per token, the sigmoid scores normalised.
        probs = s if self.score == "softmax" else s / (s.sum(dim=-1, keepdim=True) + 1e-20)
        if self.training:
            self.pending += expert_counts(idx, self.num_experts).to(self.pending.dtype)
        return Assignment.top_k(idx, w, probs)

    @torch.no_grad()
    def update_after_step(self, reduce: Reduce | None = None) -> None:
        load = self.pending if reduce is None else reduce(self.pending.clone())
        if float(load.sum()) > 0:
            step = self.update_rate * torch.sign(load.mean() - load)
            self.bias += step.to(self.bias.dtype)
            self.bias -= self.bias.mean()
        self.pending.zero_()

    def statistics(self) -> dict[str, float]:
        return {"bias_spread": float(self.bias.max() - self.bias.min())}


class ExpertChoiceRouter(Router):
    """Expert choice within each image (EC-DiT, arXiv 2410.02098).

    s = softmax (or sigmoid) of the logits, viewed per image (N, S, E); expert e takes the C tokens
    of each image with the largest s[:, :, e], C = min(S, ceil(capacity_factor * S * k / E)), each
    pair weighted by its score. A token gets any number of experts, zero included. Training and
    inference are the same rule, and no image depends on another.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, capacity_factor: float = 1.0,
                 score: str = "softmax", aux_alpha: float = 0.0):
        super().__init__(num_experts, dim)
        self.top_k, self.capacity_factor = top_k, capacity_factor
        self.score, self.aux_alpha = score, aux_alpha

    def capacity(self, tokens_per_image: int) -> int:
        c = math.ceil(self.capacity_factor * tokens_per_image * self.top_k / self.num_experts - 1e-9)
        return max(1, min(tokens_per_image, c))

    def route(self, x: torch.Tensor, cond: Any = None) -> Assignment:
        return self(x.reshape(-1, x.shape[-1]), cond, images=x.shape[0])

    def forward(self, x: torch.Tensor, cond: Any = None, images: int = 1) -> Assignment:
        t_all, e = x.shape[0], self.num_experts
        if t_all % images:
            raise ValueError(f"{t_all} tokens do not split into {images} images")
        s_img = t_all // images
        probs = scores_of(router_logits(x, self.weight), self.score)  # (T, E)
        c = self.capacity(s_img)
        per_image = probs.view(images, s_img, e).transpose(1, 2)  # (N, E, S)
        w, idx = torch.topk(per_image, k=c, dim=-1, sorted=False)  # (N, E, C)
        token = (idx + (torch.arange(images, device=x.device) * s_img).view(-1, 1, 1)).reshape(-1)
        expert = torch.arange(e, device=x.device).view(1, e, 1).expand(images, e, c).reshape(-1)
        return Assignment(token, expert, w.reshape(-1), probs, 0)


class RaceRouter(Router):
    """Expert Race (Race-DiT, arXiv 2503.16057).

    s = sigmoid (or softmax) of the logits (T, E). Training: one top-K over all T * E scores of
    the batch the layer sees (one micro-batch of one process), K = T * k; every pair weighted by
    its score. The K-th largest score (the cut-off) of each training forward is summed into
    `pending`; `update_after_step` averages it over the forwards and processes since the last step
    and moves `threshold` (persistent buffer) towards it: threshold <- d * threshold + (1 - d) *
    mean cut-off (the first update sets it). Inference: every pair with s >= threshold, so no
    image depends on another; before any update (a model never trained with this rule) inference
    falls back to top-k per token.

    `similarity_weight` > 0 adds the router-similarity loss (`router_similarity_loss`) of the
    training selection to the aux loss, against experts that are always chosen together.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, score: str = "sigmoid",
                 threshold_decay: float = 0.99, aux_alpha: float = 0.0, similarity_weight: float = 0.0):
        super().__init__(num_experts, dim)
        self.top_k, self.score = top_k, score
        self.threshold_decay, self.aux_alpha = threshold_decay, aux_alpha
        self.similarity_weight = similarity_weight
        self._last_loss: torch.Tensor | None = None
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float32))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long))
        # [sum of cut-offs, number of forwards] since the last optimizer step.
        self.register_buffer("pending", torch.zeros(2, dtype=torch.float64), persistent=False)

    def forward(self, x: torch.Tensor, cond: Any = None) -> Assignment:
        t, e = x.shape[0], self.num_experts
        logits = router_logits(x, self.weight)
        s = scores_of(logits, self.score)  # (T, E)
        if self.training:
            w, flat = torch.topk(s.reshape(-1), k=t * self.top_k, sorted=False)
            token, expert = flat // e, flat % e
            cutoff = w.detach().min()
            self.pending += torch.stack([cutoff.double(), cutoff.new_ones((), dtype=torch.float64)])
            extra = None
            if self.similarity_weight > 0:
                selected = torch.zeros(t * e, dtype=s.dtype, device=s.device).index_fill_(0, flat, 1.0).view(t, e)
                extra = self.similarity_weight * router_similarity_loss(logits.softmax(dim=-1), selected)
                self._last_loss = extra.detach()
            return Assignment(token, expert, w, s, 0, extra)
        if int(self.threshold_updates) == 0:
            w, idx = torch.topk(s, k=self.top_k, dim=-1, sorted=False)
            return Assignment.top_k(idx, w, s)
        token, expert = torch.nonzero(s >= self.threshold, as_tuple=True)
        return Assignment(token, expert, s[token, expert], s, 0)

    @torch.no_grad()
    def update_after_step(self, reduce: Reduce | None = None) -> None:
        total = self.pending if reduce is None else reduce(self.pending.clone())
        if float(total[1]) > 0:
            mean = (total[0] / total[1]).to(self.threshold.dtype)
            if int(self.threshold_updates) == 0:
                self.threshold.copy_(mean)
            else:
                self.threshold.mul_(self.threshold_decay).add_((1 - self.threshold_decay) * mean)
            self.threshold_updates += 1
        self.pending.zero_()

    def statistics(self) -> dict[str, float]:
        out = {"threshold": float(self.threshold)}
        if self._last_loss is not None:  # the last training forward's, read at log time only
            out["similarity_loss"] = float(self._last_loss)
        return out


class TokenPoolRouter(Router):
    """Expert choice over the batch-level token pool with a capacity predictor (DiffMoE, arXiv 2503.14487).

    s = softmax (or sigmoid) of the logits (T, E). Training: the pool is every token of the batch
    the layer sees (one micro-batch of one process); expert e takes the C tokens of the pool with
    the largest s[:, e], C = min(T, ceil(capacity_factor * T * k / E)), each pair weighted by its
    score. A capacity predictor Linear(D, D) -> SiLU -> Linear(D, E) on the detached tokens learns
    the 0/1 selection mask with binary cross-entropy (`Assignment.extra_loss`, added to the aux
    loss; it reaches only the predictor). Per expert, the C-th largest sigmoid(predictor) of each
    training forward is the cut-off; `update_after_step` moves `thresholds` (E,) (persistent) to
    d * thresholds + (1 - d) * mean cut-off (over forwards and processes; the first update sets
    them). Inference: expert e takes every token with sigmoid(predictor_e) >= thresholds[e],
    weighted by its score: compute varies per token and per time step, and no image depends on
    another. Before any update inference falls back to top-k per token.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, capacity_factor: float = 1.0,
                 score: str = "softmax", threshold_decay: float = 0.99, aux_alpha: float = 0.0,
                 capacity_warmup_steps: int = 0):
        super().__init__(num_experts, dim)
        self.top_k, self.capacity_factor = top_k, capacity_factor
        self.score, self.threshold_decay, self.aux_alpha = score, threshold_decay, aux_alpha
        self.capacity_warmup_steps = capacity_warmup_steps
        self.predictor = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, num_experts))
        self.register_buffer("thresholds", torch.zeros(num_experts, dtype=torch.float32))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long))
        # [cut-off sums (E), forwards, predictor agreements, predictions] since the last optimizer step.
        self.register_buffer("pending", torch.zeros(num_experts + 3, dtype=torch.float64), persistent=False)
        self._accuracy = float("nan")
        self._last_loss: torch.Tensor | None = None

    def current_capacity_factor(self) -> float:
        """capacity_factor, or during `capacity_warmup_steps` the linear decay from num_experts to it
        (by the optimizer steps counted in `threshold_updates`)."""
        if not self.capacity_warmup_steps:
            return self.capacity_factor
        left = max(0.0, 1.0 - int(self.threshold_updates) / self.capacity_warmup_steps)
        return self.capacity_factor + (self.num_experts - self.capacity_factor) * left

    def capacity(self, pool: int) -> int:
        c = math.ceil(self.current_capacity_factor() * pool * self.top_k / self.num_experts - 1e-9)
        return max(1, min(pool, c))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """(T, E) logits of the capacity predictor, on the detached tokens, in its weights' dtype."""
        with torch.autocast(x.device.type, enabled=False):
            return self.predictor(x.detach().to(self.predictor[0].weight.dtype))

    def forward(self, x: torch.Tensor, cond: Any = None) -> Assignment:
        t, e = x.shape[0], self.num_experts
        s = scores_of(router_logits(x, self.weight), self.score)  # (T, E)
        pred = self.predict(x)
        if self.training:
            c = self.capacity(t)
            w, idx = torch.topk(s.t(), k=c, dim=-1, sorted=False)  # (E, C) each expert's tokens
            token, expert = idx.reshape(-1), torch.arange(e, device=x.device).repeat_interleave(c)
            mask = torch.zeros_like(pred).index_put_((token, expert), torch.ones_like(token, dtype=pred.dtype))
            bce = F.binary_cross_entropy_with_logits(pred, mask)
            with torch.no_grad():
                cutoff = torch.topk(torch.sigmoid(pred).t(), k=c, dim=-1).values[:, -1]  # (E,)
                agree = ((pred > 0) == (mask > 0)).sum()
                self.pending += torch.cat([cutoff.double(), torch.stack(
                    [cutoff.new_ones((), dtype=torch.float64), agree.double(), torch.tensor(float(t * e), dtype=torch.float64,
                                                                                          device=x.device)])])
            self._last_loss = bce.detach()
            return Assignment(token, expert, w.reshape(-1), s, 0, bce)
        if int(self.threshold_updates) == 0:
            w, idx = torch.topk(s, k=self.top_k, dim=-1, sorted=False)
            return Assignment.top_k(idx, w, s)
        token, expert = torch.nonzero(torch.sigmoid(pred) >= self.thresholds, as_tuple=True)
        return Assignment(token, expert, s[token, expert], s, 0)

    @torch.no_grad()
    def update_after_step(self, reduce: Reduce | None = None) -> None:
        total = self.pending if reduce is None else reduce(self.pending.clone())
        e = self.num_experts
        if float(total[e]) > 0:
            mean = (total[:e] / total[e]).to(self.thresholds.dtype)
            if int(self.threshold_updates) == 0:
                self.thresholds.copy_(mean)
            else:
                self.thresholds.mul_(self.threshold_decay).add_((1 - self.threshold_decay) * mean)
            self.threshold_updates += 1
            self._accuracy = float(total[e + 1] / total[e + 2])
        self.pending.zero_()

    def statistics(self) -> dict[str, float]:
        out = {"predictor_accuracy": self._accuracy, "threshold_mean": float(self.thresholds.mean())}
        if self._last_loss is not None:  # the last training forward's, read at log time only
            out["predictor_bce"] = float(self._last_loss)
        return out


class PrototypeRouter(Router):
    """Conditional prototypical routing (ProMoE, arXiv 2510.24711).

    The last of the E experts is the unconditional expert: every token of an image whose label is
    the null class (`num_classes`, classifier-free guidance's unconditional branch) goes to it
    alone, with weight 1. The other tokens route among the first E - 1 experts by cosine
    similarity between the L2-normalised token and E - 1 learnable prototypes: top-k, weighted by
    the raw cosine (`score` "auto"), or its softmax / sigmoid. `cond` carries the labels (N,) of the
    N images; without them every token is conditional. In training a routing contrastive loss
    (`Assignment.extra_loss`, weight `contrastive_weight`) pulls each prototype towards the mean of
    the conditional tokens whose first choice it is and away from the other prototypes' means:
    cross-entropy over cos(prototype_i, mean_j) / temperature with target i = j, over the
    prototypes that got tokens (zero when fewer than two did). The same rule at inference; no
    image depends on another.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, num_classes: int, score: str = "auto",
                 contrastive_weight: float = 1.0, temperature: float = 0.07, aux_alpha: float = 0.0):
        super().__init__(num_experts)  # no gate weight: tokens are scored against the prototypes
        if num_experts < 2 or not 1 <= top_k <= num_experts - 1:
            raise ValueError(f"prototype routing needs num_experts >= 2 and 1 <= top_k <= num_experts - 1, got "
                             f"{num_experts} experts, top_k {top_k}")
        self.top_k, self.num_classes, self.score = top_k, num_classes, score
        self.contrastive_weight, self.temperature, self.aux_alpha = contrastive_weight, temperature, aux_alpha
        self.prototypes = nn.Parameter(torch.empty(num_experts - 1, dim))
        nn.init.normal_(self.prototypes, std=0.02)
        self.register_buffer("usage", torch.zeros(num_experts, dtype=torch.float64), persistent=False)
        self._last_loss: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:  # where other routers' linear weight is (device, dtype look-ups)
        return self.prototypes

    def route(self, x: torch.Tensor, cond: Any = None) -> Assignment:
        n, t, d = x.shape
        labels = None if cond is None else torch.as_tensor(cond, device=x.device).reshape(-1).repeat_interleave(t)
        return self(x.reshape(n * t, d), labels)

    def forward(self, x: torch.Tensor, cond: Any = None) -> Assignment:
        """x (T, D); cond: per-token labels (T,) or None."""
        t_all, e = x.shape[0], self.num_experts
        dt = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            xs = x.to(dt)
            cos = F.normalize(xs, dim=-1) @ F.normalize(self.prototypes.to(dt), dim=-1).t()  # (T, E - 1)
        w_all = cos.softmax(-1) if self.score == "softmax" else torch.sigmoid(cos) if self.score == "sigmoid" else cos
        uncond = (cond == self.num_classes) if cond is not None else torch.zeros(t_all, dtype=torch.bool,
                                                                                 device=x.device)
        cond_tok = torch.nonzero(~uncond).squeeze(1)
        unc_tok = torch.nonzero(uncond).squeeze(1)
        w, idx = torch.topk(w_all.index_select(0, cond_tok), k=self.top_k, dim=-1)  # sorted: slot 0 is the first choice
        token = torch.cat([cond_tok.repeat_interleave(self.top_k), unc_tok])
        expert = torch.cat([idx.reshape(-1), torch.full_like(unc_tok, e - 1)])
        weight = torch.cat([w.reshape(-1), torch.ones(unc_tok.numel(), dtype=w.dtype, device=x.device)])
        # Probabilities over all E experts for the (optional) balance loss: softmax of the cosines
        # for conditional tokens, the unconditional expert for the others.
        probs = torch.cat([cos.softmax(-1), cos.new_zeros(t_all, 1)], 1)
        probs = torch.where(uncond.unsqueeze(1), F.one_hot(torch.full_like(uncond, e - 1, dtype=torch.long), e).to(probs.dtype),
                            probs)
        extra = None
        if self.training:
            with torch.no_grad():
                self.usage += expert_counts(expert, e).to(self.usage.dtype)
            if self.contrastive_weight > 0:
                extra = self.contrastive_weight * self.contrastive_loss(xs.index_select(0, cond_tok), idx[:, 0])
                self._last_loss = extra.detach()
        return Assignment(token, expert, weight, probs, 0, extra)

    def contrastive_loss(self, tokens: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of cos(prototype_i, mean of its tokens_j) / temperature, target i = j,
        over the prototypes that are some token's first choice."""
        p = self.prototypes.shape[0]
        counts = expert_counts(first, p)
        sums = tokens.new_zeros(p, tokens.shape[1]).index_add_(0, first, tokens)
        used = torch.nonzero(counts > 0).squeeze(1)
        if used.numel() < 2:
            return tokens.sum() * 0.0
        means = sums.index_select(0, used) / counts.index_select(0, used).unsqueeze(1).to(tokens.dtype)
        protos = self.prototypes.to(tokens.dtype).index_select(0, used)
        sim = F.normalize(protos, dim=-1) @ F.normalize(means, dim=-1).t()
        return F.cross_entropy(sim / self.temperature, torch.arange(used.numel(), device=tokens.device))

    def statistics(self) -> dict[str, float]:
        u = self.usage
        total = float(u[:-1].sum())
        out = {"prototypes_used": float((u[:-1] > 0).sum()),
               "uncond_share": float(u[-1] / u.sum()) if float(u.sum()) else 0.0,
               "prototype_max_share": float(u[:-1].max() / total) if total else 0.0}
        if self._last_loss is not None:  # the last training forward's, read at log time only
            out["contrastive_loss"] = float(self._last_loss)
        u.zero_()
        return out


def build_router(kind: str, dim: int, num_experts: int, top_k: int, *, norm_topk: bool = False,
                 aux_alpha: float | None = None, score: str = "auto", capacity_factor: float = 1.0,
                 capacity_warmup_steps: int = 0,
                 bias_update_rate: float = 1e-3, route_scale: float = 1.0, threshold_decay: float = 0.99,
                 num_classes: int = 1000, contrastive_weight: float = 1.0,
                 contrastive_temperature: float = 0.07, similarity_weight: float = 0.0) -> Router:
    """The router of rule `kind` (one of ROUTERS) with its knobs; None / "auto" take the rule's defaults."""
    if kind not in ROUTERS:
        raise ValueError(f"unknown router {kind!r}; choose one of {ROUTERS}")
    alpha = DEFAULT_AUX_ALPHA[kind] if aux_alpha is None else aux_alpha
    score = DEFAULT_SCORE[kind] if score == "auto" and kind != "prototype" else score
    if kind == "topk_softmax":
        if score != "softmax":
            raise ValueError("router topk_softmax scores by softmax; use topk_bias for sigmoid scores")
        return TopKRouter(dim, num_experts, top_k, norm_topk, alpha)
    if kind == "topk_bias":
        return BiasTopKRouter(dim, num_experts, top_k, norm_topk, alpha, score, bias_update_rate, route_scale)
    if kind == "expert_choice":
        return ExpertChoiceRouter(dim, num_experts, top_k, capacity_factor, score, alpha)
    if kind == "prototype":
        return PrototypeRouter(dim, num_experts, top_k, num_classes, score, contrastive_weight,
                               contrastive_temperature, alpha)
    if kind == "token_pool":
        return TokenPoolRouter(dim, num_experts, top_k, capacity_factor, score, threshold_decay, alpha,
                               capacity_warmup_steps)
    return RaceRouter(dim, num_experts, top_k, score, threshold_decay, alpha, similarity_weight)


def routers_of(model: nn.Module) -> list[Router]:
    return [m for m in model.modules() if isinstance(m, Router)]


@torch.no_grad()
def update_routers(model: nn.Module, reduce: Reduce | None = None) -> None:
    """After an optimizer step: every router of `model` moves its state (bias, threshold) with the
    statistics its training forwards gathered; `reduce` sums them over the data-parallel processes."""
    for r in routers_of(model):
        r.update_after_step(reduce)


def router_statistics(model: nn.Module) -> dict[str, float]:
    """Cheap statistics of the routers for the training log, averaged over layers (e.g. bias_spread)."""
    sums: dict[str, list[float]] = {}
    for r in routers_of(model):
        for k, v in r.statistics().items():
            sums.setdefault(k, []).append(v)
    return {k: sum(v) / len(v) for k, v in sums.items()}


__all__ = ["ROUTERS", "SCORE_FUNCS", "Assignment", "BalanceLoss", "BiasTopKRouter", "ExpertChoiceRouter",
           "PrototypeRouter", "RaceRouter", "Reduce", "Router", "TokenPoolRouter", "TopKRouter", "balance_loss", "build_router", "expert_counts",
           "router_logits", "router_similarity_loss", "router_statistics", "routers_of", "update_routers"]
