"""Everything distributed lives here; the model is written for one device and a layout is applied to it.

Layouts, applied from outside by `wrap_model(model, mode, dist, ep_size)`:

- "none": one process;
- "ddp": DistributedDataParallel (every rank holds everything, gradients all-reduced);
- "fsdp": FSDP2 (`torch.distributed.fsdp.fully_shard` per block and at the root; ZeRO-3);
- "ep": expert parallel (each rank of an ep group holds E/ep experts of every MoE layer, tokens
  travel by all-to-all) with DDP for the dense weights;
- "ep_fsdp": expert parallel with FSDP2 for the dense weights.

Modules: `data` (wrapping, gradient sync, EMA layout, clipping), `expert` (the expert-parallel
layer, its all-to-all and state conversion), `state` (full state dicts under every layout),
`sharded` (sharded checkpoints: every rank writes and reads its own shards through
torch.distributed.checkpoint), `dcp_files` (a sharded checkpoint's folder, read in one process),
`launch` (run a function in N local processes, as torchrun would: tests, benchmarks),
`balance` (the balance loss over all processes, attached to the routers from outside, and the sum
over processes the stateful routers' updates use).
docs/scaling.md says which layout to use and how to launch it.
Checkpoints hold single-process state: full state dicts in a file, or in a sharded folder every
tensor as its global tensor under its single-process name; either kind saved under any layout
loads under any other, single-process included.
"""

from __future__ import annotations

from .balance import attach_global_balance, global_balance_loss, sum_over_processes
from .data import MODES, clip_grad_norm_, no_sync_if, shard_ema, wrap_model
from .expert import (ExpertParallelExperts, all_to_all, apply_expert_parallel, expert_parallel_groups,
                     gather_expert_optimizer_state, gather_expert_state, load_expert_parallel_state,
                     shard_expert_optimizer_state, shard_expert_state)
from .state import full_gradients, full_model_state, full_optimizer_state, load_full_model_state, load_full_optimizer_state

__all__ = [
    "MODES", "wrap_model", "attach_global_balance", "global_balance_loss", "sum_over_processes", "no_sync_if", "shard_ema", "clip_grad_norm_",
    "full_gradients", "full_model_state", "full_optimizer_state", "load_full_model_state", "load_full_optimizer_state",
    "ExpertParallelExperts", "all_to_all", "apply_expert_parallel", "expert_parallel_groups",
    "gather_expert_state", "shard_expert_state", "load_expert_parallel_state",
    "gather_expert_optimizer_state", "shard_expert_optimizer_state",
]
