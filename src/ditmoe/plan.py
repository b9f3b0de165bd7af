"""Memory and communication planner: will a model train on G GPUs, and in which layout?

`ditmoe plan --model DiT-MoE-G/2-16E2A --gpus 64 --gpu-mem 80 --batch 1024 --ep 8` prints, per
GPU and for each layout the trainer implements (DDP, FSDP = ZeRO-3, expert parallel with DDP or
FSDP for the dense weights):

- model state: weights (the bf16 working copy when training in bf16), fp32 gradients, AdamW
  state (fp32 master weights, m, v) and the fp32 EMA copy, each divided by however many GPUs
  share it;
- the transient weight working set (FSDP all-gathers one block ahead; autocast keeps a bf16
  copy of every weight it used until the backward);
- the optimizer step's temporaries (torch's foreach AdamW makes a full-size temporary of the
  parameters it steps), which peak after the activations are freed;
- activations (what autograd saves for the backward), with and without activation
  checkpointing, from a per-token, per-layer count of the tensors this implementation saves
  (`activation_bytes_per_token`, checked against the measured saved tensors in the tests);
- all-to-all traffic per step (bytes each GPU sends), and the weight / gradient collectives;

and whether the peak, model state + the larger of (working set + activations) and the step's
temporaries, plus a headroom for the CUDA context, communication buffers and allocator
fragmentation) fits in the GPU memory. Sizes are in GiB (2^30 bytes); `--gpu-mem` is in GiB too
(an "80 GB" H100 has 79.6 GiB usable).

Byte accounting of the trainer's mixed precision: the parameters are fp32 (they are the master
weights), autocast (or FSDP's mixed-precision all-gather) makes the bf16 working copies, the
gradients and AdamW's m and v are fp32, the EMA is fp32. That is 4 + 4 + 8 + 4 = 20 bytes per
parameter plus the bf16 working copy, the same as the textbook "bf16 weights + fp32 master".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .config import ModelConfig

GIB = float(2 ** 30)
LAYOUTS = ("ddp", "fsdp", "ep", "ep_fsdp")
LAYOUT_TITLES = {"ddp": "DDP", "fsdp": "FSDP (ZeRO-3)", "ep": "EP + DDP", "ep_fsdp": "EP + FSDP"}


# ------------------------------------------------------------------------------ inputs
@dataclass
class PlanInput:
    model: ModelConfig
    gpus: int
    gpu_mem_gib: float = 80.0
    batch: int = 1024  # global batch (images per optimizer step)
    micro_batch: int = 0  # images per forward per GPU; 0 = batch / gpus (no accumulation)
    ep: int = 8  # expert-parallel group size (EP layouts)
    checkpointing: bool = False  # activation checkpointing per block (the trainer's --grad-checkpointing)
    precision: str = "bf16"  # "bf16" (autocast / FSDP mixed precision) or "fp32"
    image_size: int = 256  # pixels; the latent is image_size / vae_downsample
    vae_downsample: int = 8
    gpus_per_node: int = 8
    headroom: float = 0.10  # fraction of GPU memory kept free (context, NCCL buffers, fragmentation)
    imbalance: float = 1.0  # routed rows on the busiest GPU / the average (EP activations)

    def validate(self) -> "PlanInput":
        problems = []
        if self.gpus <= 0 or self.batch <= 0 or self.gpu_mem_gib <= 0:
            problems.append("gpus, batch and gpu memory must be positive")
        micro = self.micro_batch or self.batch // max(self.gpus, 1)
        if micro <= 0 or self.batch % (self.gpus * micro):
            problems.append(f"batch {self.batch} does not split into {self.gpus} GPUs x micro-batch {micro}")
        if self.precision not in ("bf16", "fp32"):
            problems.append(f"precision {self.precision!r} is not 'bf16' or 'fp32'")
        if self.image_size % (self.vae_downsample * self.model.patch_size):
            problems.append(f"image size {self.image_size} is not a multiple of {self.vae_downsample * self.model.patch_size}")
        if problems:
            raise ValueError("invalid plan: " + "; ".join(problems))
        return self

    @property
    def micro(self) -> int:
        return self.micro_batch or self.batch // self.gpus

    @property
    def accumulation(self) -> int:
        return self.batch // (self.gpus * self.micro)

    @property
    def tokens_per_image(self) -> int:
        return self.model.tokens(self.image_size, self.vae_downsample)

    @property
    def compute_bytes(self) -> int:
        return 2 if self.precision == "bf16" else 4


# ------------------------------------------------------------------------------ parameters
@dataclass
class ParamCounts:
    total: int
    experts: int  # routed expert weights, all layers
    dense: int  # everything else (attention, router, shared expert, adaLN, embedders, final layer)
    expert_per_layer: int  # routed expert weights of one MoE layer (all E experts)
    largest_block: int  # parameters of the largest block (one FSDP unit)
    largest_block_dense: int  # ... without its routed experts
    moe_layers: int


def param_counts(cfg: ModelConfig) -> ParamCounts:
    """Counts from the model itself, built on the meta device (no memory), as accounting does."""
    import torch

    from .models.dit import DiT

    with torch.device("meta"):
        model = DiT(cfg)
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".moe.experts." in n)
    blocks = [(sum(p.numel() for p in b.parameters()),
               sum(p.numel() for p in b.moe.experts.parameters()) if b.is_moe else 0) for b in model.blocks]
    moe_layers = sum(cfg.moe_blocks())
    largest = max(blocks, key=lambda b: b[0])
    return ParamCounts(total, experts, total - experts, experts // max(moe_layers, 1), largest[0],
                       largest[0] - largest[1], moe_layers)


# ------------------------------------------------------------------------------ activations
def pairs_per_token(cfg: ModelConfig) -> float:
    """Mean routed (token, expert) pairs per token under cfg's router (k for top-k; expert_choice
    from its capacity; the training-time figure for the threshold rules), as `ditmoe info` counts."""
    from .accounting import experts_per_token

    return experts_per_token(cfg, cfg.tokens())[0] if cfg.is_moe else float(cfg.top_k)


def activation_bytes_per_token(cfg: ModelConfig, compute_bytes: int = 2) -> dict[str, float]:
    """Bytes autograd saves per token, by part, for this implementation (forward of one image batch).

    `compute_bytes` is 2 under bf16 autocast, 4 in fp32. Residual-stream and LayerNorm tensors are
    fp32 in both (autocast runs LayerNorm and the elementwise adaLN modulation in fp32), as are
    the router's inputs and probabilities; index tensors are int64. Under autocast each Linear
    saves its own low-precision copy of an fp32 input. Per-image tensors (timestep and label
    embeddings, adaLN inputs) are below 0.1% and left out; so are the attention scores, which
    SDPA's fused kernels never store (they keep q, k, v, the output and the log-sum-exp).

    Returns {"attention": per block, "moe": per MoE block, "mlp": per dense block,
    "outside": patch embedding, final layer and loss}.
    """
    a, f, i = compute_bytes, 4, 8  # compute dtype, fp32, int64
    autocast = a != f
    d, heads, k = cfg.hidden_size, cfg.num_heads, pairs_per_token(cfg)
    h, hs, e = cfg.routed_hidden, cfg.shared_width, cfg.num_experts

    def pre_norm() -> float:
        # LayerNorm input (residual, fp32) and its mean / rstd; the LayerNorm output (fp32, kept
        # by the adaLN scale's product).
        return 2 * f * d + 2 * f

    def linear_input() -> float:
        # The modulated input of the first Linear: its own autocast copy, else the fp32 tensor.
        return a * d if autocast else f * d

    attention = pre_norm() + linear_input()
    attention += 3 * a * d  # the qkv projection's output; SDPA keeps q, k, v as views of it
    if cfg.attn_layout == "fused_qknorm":
        attention += 2 * a * d + 4 * heads * f  # LayerNormed q and k, their statistics
    attention += a * d + heads * f  # SDPA output (= the out-projection's input) and log-sum-exp
    attention += a * d  # out-projection output, kept by the gate product

    moe = pre_norm() + f * d  # + the modulated fp32 tokens (router input; shared input in fp32)
    moe += e * f + 3 * k * i  # router probabilities; top-k ids, sort order and its inverse
    # Per routed slot: the token copy (first grouped GEMM's input), the expert's activation
    # input (swiglu: the fused [gate | up] product, 2H wide, which its custom backward alone
    # keeps; gelu: the H-wide pre-activation) and its output (the second GEMM's input, H wide);
    # then the k weighted outputs gathered back and their weights.
    moe += k * _routed_bytes_per_slot(cfg, a) + k * a
    if hs:
        moe += (2 * a * d if autocast else 0) + 4 * a * hs  # shared SwiGLU: input copies, gate, SiLU, up, product
    moe += a * d  # the layer's output, kept by the gate product

    dense_h = cfg.dense_hidden
    mlp = pre_norm() + linear_input() + a * d
    mlp += (4 * a * dense_h + (a * d if autocast else 0)) if cfg.dense_mlp_type == "swiglu" else 2 * a * dense_h

    p2 = cfg.patch_size ** 2
    outside = a * p2 * cfg.in_channels  # the patch embedding's input
    outside += pre_norm() + linear_input()  # final adaLN layer
    outside += f * p2 * cfg.in_channels  # the loss's residual (prediction - target), fp32
    return {"attention": float(attention), "moe": float(moe), "mlp": float(mlp), "outside": float(outside)}


def activation_bytes(cfg: ModelConfig, tokens: int, compute_bytes: int = 2, checkpointing: bool = False,
                     imbalance: float = 1.0) -> float:
    """Saved-activation bytes of a forward over `tokens` tokens (peak, just before the backward).

    With activation checkpointing each block keeps only its input (fp32 residual stream) and
    the backward recomputes one block at a time, so the peak adds one block's full activations.
    `imbalance` scales the routed-expert part (the busiest GPU's share under expert parallelism).
    """
    per = activation_bytes_per_token(cfg, compute_bytes)
    moe_blocks = cfg.moe_blocks()
    routed = pairs_per_token(cfg) * _routed_bytes_per_slot(cfg, compute_bytes) * (imbalance - 1.0)
    blocks = [per["attention"] + (per["moe"] + routed if m else per["mlp"]) for m in moe_blocks]
    if not checkpointing:
        return tokens * (sum(blocks) + per["outside"])
    return tokens * (len(blocks) * 4 * cfg.hidden_size + max(blocks) + per["outside"])


def _routed_bytes_per_slot(cfg: ModelConfig, a: int) -> float:
    """Saved bytes of one (token, expert) slot: input copy, activation input and output, output copy."""
    d, h = cfg.hidden_size, cfg.routed_hidden
    activation_input = 2 * a * h if cfg.expert_type == "swiglu" else a * h
    return a * d + activation_input + a * h + a * d


# ------------------------------------------------------------------------------ the plan
@dataclass
class LayoutPlan:
    layout: str  # trainer --parallel value
    title: str
    feasible: str  # "" or why the layout does not apply (e.g. E not divisible by ep)
    memory: dict[str, float] = field(default_factory=dict)  # GiB per GPU held all along, by component
    working: float = 0.0  # GiB: weight copies in the compute dtype during forward and backward
    step_temp: float = 0.0  # GiB: the optimizer step's temporaries (after the backward)
    activations: float = 0.0  # GiB, without checkpointing
    activations_ckpt: float = 0.0  # GiB, with checkpointing
    all_to_all: float = 0.0  # bytes each GPU sends per optimizer step
    all_to_all_inter_node: float = 0.0  # ... of which cross nodes
    collectives: float = 0.0  # weight all-gather / gradient reduce bytes each GPU sends per step
    total: float = 0.0  # GiB with the chosen checkpointing setting
    total_ckpt: float = 0.0
    total_no_ckpt: float = 0.0
    usable: float = 0.0  # GiB available after the headroom

    @property
    def fits(self) -> bool:
        return not self.feasible and self.total <= self.usable

    def to_dict(self) -> dict:
        return {**asdict(self), "fits": self.fits}


def _ring(n: int) -> float:
    """Fraction of a buffer each rank sends in a ring all-gather or reduce-scatter."""
    return (n - 1) / n if n > 1 else 0.0


def plan(inp: PlanInput) -> list[LayoutPlan]:
    """One LayoutPlan per layout in LAYOUTS."""
    inp.validate()
    cfg, n = inp.model, inp.gpus
    pc = param_counts(cfg)
    mixed = inp.precision == "bf16"
    w = 2 if mixed else 4  # bytes of the working copy of a weight
    tokens = inp.micro * inp.tokens_per_image  # per GPU per forward
    a2a_transfers = 4 + (2 if inp.checkpointing else 0)  # dispatch + combine, forward and backward (+ recompute)
    usable = inp.gpu_mem_gib * (1.0 - inp.headroom)

    out = []
    for layout in LAYOUTS:
        lp = LayoutPlan(layout, LAYOUT_TITLES[layout], "", usable=usable)
        ep = inp.ep if layout.startswith("ep") else 1
        if layout.startswith("ep"):
            if not pc.experts:
                lp.feasible = "no experts to split"
            elif cfg.num_experts % ep or n % ep:
                lp.feasible = f"ep {ep} must divide the experts ({cfg.num_experts}) and the GPUs ({n})"
        dp = n // ep if not lp.feasible else n
        sharded = layout in ("fsdp", "ep_fsdp")
        # Parameters resident per GPU, dense and expert, by who shares them.
        if layout == "ddp":
            dense_share, expert_share = pc.dense, pc.experts
        elif layout == "fsdp":
            dense_share, expert_share = pc.dense / n, pc.experts / n
        elif layout == "ep":
            dense_share, expert_share = pc.dense, pc.experts / ep
        else:  # ep_fsdp: dense over all GPUs, each expert slice over its dp group
            dense_share, expert_share = pc.dense / n, pc.experts / ep / dp
        resident = dense_share + expert_share
        lp.memory["weights fp32 (master)"] = 4 * resident / GIB
        lp.memory["gradients fp32"] = 4 * resident / GIB
        lp.memory["AdamW m, v fp32"] = 8 * resident / GIB
        lp.memory["EMA fp32"] = 4 * resident / GIB
        # The working set of weights in the compute dtype.
        if sharded:
            if layout == "fsdp":
                unit, unit_dense = pc.largest_block, pc.largest_block
            else:
                unit_dense = pc.largest_block_dense
                unit = unit_dense + pc.expert_per_layer / ep
            # Two units gathered (the current one and the prefetched next), one unit's unsharded
            # gradient before its reduce-scatter (compute dtype, then an fp32 copy for the reduce).
            lp.working = (2 * unit * w + unit * (w + 4)) / GIB
        elif mixed:
            # autocast's bf16 copy of every weight a forward used, saved for the backward.
            lp.working = w * resident / GIB
        # foreach AdamW: one fp32 temporary the size of the parameters it steps (measured on an H200:
        # the peak of a step is the state plus 4 bytes per parameter).
        lp.step_temp = 4 * resident / GIB
        state = sum(lp.memory.values())
        imb = inp.imbalance if layout.startswith("ep") else 1.0
        lp.activations = activation_bytes(cfg, tokens, inp.compute_bytes, False, imb) / GIB
        lp.activations_ckpt = activation_bytes(cfg, tokens, inp.compute_bytes, True, imb) / GIB
        lp.total_no_ckpt = state + max(lp.working + lp.activations, lp.step_temp)
        lp.total_ckpt = state + max(lp.working + lp.activations_ckpt, lp.step_temp)
        lp.total = lp.total_ckpt if inp.checkpointing else lp.total_no_ckpt

        # Communication per optimizer step, bytes each GPU sends.
        steps = inp.accumulation
        if layout.startswith("ep") and not lp.feasible:
            rows = tokens * pairs_per_token(cfg) * pc.moe_layers * steps  # routed (token, expert) rows per GPU
            sent = rows * cfg.hidden_size * inp.compute_bytes * _ring(ep) * a2a_transfers
            lp.all_to_all = sent
            # Ranks of an ep group are consecutive; a group wider than a node crosses nodes.
            if ep > inp.gpus_per_node:
                lp.all_to_all_inter_node = sent * (ep - inp.gpus_per_node) / (ep - 1)
        grad_bytes = 4  # gradients are reduced in fp32
        if layout == "ddp":
            lp.collectives = 2 * _ring(n) * pc.total * grad_bytes
        elif layout == "fsdp":
            # all-gather for forward and backward of every micro-batch, reduce-scatter each micro-batch
            lp.collectives = steps * _ring(n) * pc.total * (2 * w + grad_bytes)
        elif layout == "ep" and not lp.feasible:
            lp.collectives = 2 * _ring(n) * pc.dense * grad_bytes + 2 * _ring(dp) * pc.experts / ep * grad_bytes
        elif not lp.feasible:
            lp.collectives = steps * (_ring(n) * pc.dense * (2 * w + grad_bytes)
                                      + _ring(dp) * pc.experts / ep * (2 * w + grad_bytes))
        out.append(lp)
    return out


# ------------------------------------------------------------------------------ report
def _gib(x: float) -> str:
    return f"{x:.1f}"


def _bytes(x: float) -> str:
    if x == 0:
        return "0"
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if x >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x / 1e3:.1f} kB"


def format_plan(inp: PlanInput, plans: list[LayoutPlan], counts: ParamCounts | None = None) -> str:
    """A markdown report: the inputs, one memory table, one communication table, the verdict."""
    counts = counts or param_counts(inp.model)
    cfg = inp.model
    lines = [
        f"## {cfg.name} on {inp.gpus} x {inp.gpu_mem_gib:g} GiB GPUs",
        "",
        f"{counts.total / 1e9:.2f}B parameters ({counts.experts / 1e9:.2f}B in routed experts, "
        f"{counts.dense / 1e9:.2f}B dense); global batch {inp.batch}, micro-batch {inp.micro} per GPU "
        f"(accumulation {inp.accumulation}), {inp.image_size}x{inp.image_size} images = {inp.tokens_per_image} "
        f"tokens each; {inp.precision}; ep {inp.ep}; activation checkpointing "
        f"{'on' if inp.checkpointing else 'off'}; headroom {inp.headroom:.0%}.",
        "",
        "Memory per GPU (GiB):",
        "",
        "| | " + " | ".join(p.title for p in plans) + " |",
        "| --- | " + " | ".join("---:" for _ in plans) + " |",
    ]
    for row in plans[0].memory:
        lines.append(f"| {row} | " + " | ".join(_gib(p.memory[row]) if not p.feasible else "-" for p in plans) + " |")
    lines.append("| weights, compute-dtype copies (forward, backward) | " + " | ".join(_gib(p.working) if not p.feasible else "-" for p in plans) + " |")
    lines.append("| activations | " + " | ".join(_gib(p.activations) if not p.feasible else "-" for p in plans) + " |")
    lines.append("| activations, checkpointed | " + " | ".join(_gib(p.activations_ckpt) if not p.feasible else "-" for p in plans) + " |")
    lines.append("| AdamW step temporaries (after the backward) | " + " | ".join(_gib(p.step_temp) if not p.feasible else "-" for p in plans) + " |")
    lines.append("| **peak** | " + " | ".join(f"**{_gib(p.total_no_ckpt)}**" if not p.feasible else "-" for p in plans) + " |")
    lines.append("| **peak, checkpointed** | " + " | ".join(f"**{_gib(p.total_ckpt)}**" if not p.feasible else "-" for p in plans) + " |")
    lines.append(f"| fits in {plans[0].usable:.1f} GiB ({'with' if inp.checkpointing else 'without'} checkpointing) | "
                 + " | ".join(("yes" if p.fits else "no") if not p.feasible else "n/a" for p in plans) + " |")
    lines += [
        "",
        "Communication per optimizer step, bytes sent by each GPU:",
        "",
        "| | " + " | ".join(p.title for p in plans) + " |",
        "| --- | " + " | ".join("---:" for _ in plans) + " |",
        "| all-to-all (tokens) | " + " | ".join(_bytes(p.all_to_all) if not p.feasible else "-" for p in plans) + " |",
        "| of which across nodes | " + " | ".join(_bytes(p.all_to_all_inter_node) if not p.feasible else "-" for p in plans) + " |",
        "| weight / gradient collectives | " + " | ".join(_bytes(p.collectives) if not p.feasible else "-" for p in plans) + " |",
    ]
    skipped = [f"{p.title}: {p.feasible}" for p in plans if p.feasible]
    if skipped:
        lines += ["", "Not applicable: " + "; ".join(skipped) + "."]
    fitting = [p for p in plans if p.fits]
    lines.append("")
    if fitting:
        best = min(fitting, key=lambda p: (p.all_to_all_inter_node + p.collectives, p.total))
        flag = " --grad-checkpointing true" if inp.checkpointing else ""
        ep_flag = f" --ep-size {inp.ep}" if best.layout.startswith("ep") else ""
        lines.append(f"Fits: {', '.join(p.title for p in fitting)}. Least traffic among them: {best.title} "
                     f"(`--parallel {best.layout}{ep_flag}{flag}`).")
    else:
        lines.append("No layout fits" + ("; try --checkpointing" if not inp.checkpointing else "")
                     + ", a smaller micro-batch (--micro-batch, with accumulation) or more GPUs.")
    return "\n".join(lines)


__all__ = ["PlanInput", "ParamCounts", "LayoutPlan", "LAYOUTS", "param_counts", "activation_bytes_per_token",
           "activation_bytes", "plan", "format_plan"]
