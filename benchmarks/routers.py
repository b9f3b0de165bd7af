#!/usr/bin/env python
"""The cost of each routing rule: one MoE layer's training forward + backward (and the rule's
after-step update) per token, relative to topk_softmax, with the speed layers of `ditmoe.kernels`.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/routers.py                 # S/2 width, fp32, CPU
    .venv/bin/python benchmarks/routers.py --device cuda --precision bf16   # on a GPU

Every rule runs at the same nominal activated compute (k = 2 of E = 8 experts of width 4D, shared
expert 2D; capacity_factor 1, so expert_choice and token_pool also average k pairs per token; race
takes exactly T k pairs). Rounds rotate the order of the rules; the table gives the median time
per token, the ratio to topk_softmax and the measured pairs per token (the activated compute).
Each round feeds a new input, so the expert group sizes change between rounds as in training.
`--json PATH` also writes the numbers. `--reference-dispatch` adds, per rule, the same layer with
the reference model's dispatcher (`ditmoe.models.moe.Dispatcher`: unpadded, no written-out
backward passes) in place of the speed layers' plan, timed in the same rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

RULES = ("topk_softmax", "topk_bias", "expert_choice", "race", "token_pool", "prototype")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=384, help="hidden size D (S/2: 384)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert-hidden", type=int, default=0, help="routed expert width; 0 = 4 D")
    p.add_argument("--images", type=int, default=4)
    p.add_argument("--tokens", type=int, default=256, help="tokens per image")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--json", default="", help="also write the results to this JSON file")
    p.add_argument("--reference-dispatch", action="store_true",
                   help="also time each rule with the reference dispatcher instead of the fast plan")
    args = p.parse_args()
    if min(args.dim, args.images, args.tokens, args.rounds, args.threads, args.experts, args.top_k) < 1:
        p.error("every size, --rounds and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    from ditmoe import kernels
    from ditmoe.models.moe import Dispatcher, MoE
    from ditmoe.models.routers import build_router, update_routers

    dev = torch.device(args.device)
    d, e, k = args.dim, args.experts, args.top_k
    hidden = args.expert_hidden or 4 * d
    layers = {}
    for rule in RULES:
        torch.manual_seed(0)
        router = build_router(rule, d, e, k, num_classes=10)
        layers[rule] = kernels.apply(MoE(d, e, k, hidden, 2 * d, router=router)).to(dev).train()
        if args.reference_dispatch:
            torch.manual_seed(0)
            router = build_router(rule, d, e, k, num_classes=10)
            ref = kernels.apply(MoE(d, e, k, hidden, 2 * d, router=router)).to(dev).train()
            ref.dispatcher = Dispatcher()
            layers[f"{rule} (reference dispatch)"] = ref
    names = list(layers)
    # A fresh input every round (the same one for every rule within a round): routing, and with it
    # the expert group sizes, change from step to step as they do in training.
    inputs = [torch.randn(args.images, args.tokens, d, device=dev, requires_grad=True) for _ in range(args.rounds + 1)]
    g = torch.randn(args.images, args.tokens, d, device=dev)
    labels = torch.randint(0, 10, (args.images,), device=dev)
    labels[0] = 10  # one unconditional image, as under label dropout (prototype's unconditional expert)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    pairs: dict[str, float] = {}

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def step(rule: str, x: torch.Tensor) -> float:
        m = layers[rule]
        for q in m.parameters():
            q.grad = None
        x.grad = None
        sync()
        t0 = time.perf_counter()
        with autocast:
            y, aux = m(x, labels, return_aux=True)
        outs, grads = [y.float()], [g]
        if aux.requires_grad:  # the balance loss or a rule's own loss
            outs.append(aux)
            grads.append(torch.ones_like(aux))
        torch.autograd.backward(outs, grads)
        update_routers(m)
        sync()
        return time.perf_counter() - t0

    for rule in names:  # warm-up (kernels compile, oneDNN caches); the pairs of each rule
        layers[rule].observer = lambda moe, a, n, rule=rule: pairs.__setitem__(rule, a.token.numel() / a.num_tokens)
        step(rule, inputs[0])
        layers[rule].observer = None
    times: dict[str, list[float]] = {r: [] for r in names}
    for i in range(args.rounds):
        order = names[i % len(names):] + names[:i % len(names)]
        for rule in order:
            times[rule].append(step(rule, inputs[i + 1]))
    n_tok = args.images * args.tokens
    base = statistics.median(times["topk_softmax"])
    rows = []
    print(f"MoE layer forward + backward, D={d}, E={e}, k={k}, width {hidden}, {args.images} x {args.tokens} tokens, "
          f"{args.precision} on {dev} ({args.threads} thread(s)), median of {args.rounds} rounds")
    print("| router | us / token | vs topk_softmax | pairs / token |")
    print("| --- | --- | --- | --- |")
    for rule in names:
        med = statistics.median(times[rule])
        row = {"router": rule, "us_per_token": 1e6 * med / n_tok, "ratio": med / base, "pairs_per_token": pairs[rule],
               "spread": (max(times[rule]) - min(times[rule])) / med}
        rows.append(row)
        print(f"| {rule} | {row['us_per_token']:.2f} | {row['ratio']:.2f} | {row['pairs_per_token']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
