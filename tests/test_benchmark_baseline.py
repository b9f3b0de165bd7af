"""The benchmark's official-algorithm baseline computes what the package computes.

`benchmarks/official_moe.py` re-implements the official DiT-MoE layer (masked per-expert loop with
a k-fold copy in training, `moe_infer` in inference) as the speed baseline; these tests pin that it
is the same function as `ditmoe.models.moe.MoE` and a slow per-token reference, so the benchmark
compares like with like. The last tests smoke-run `benchmarks/moe_bench.py --quick`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import official_moe  # noqa: E402
from official_moe import DenseBound, OfficialMoE, official_from_package, officialize  # noqa: E402

from ditmoe import create_model  # noqa: E402
from ditmoe import kernels  # noqa: E402
from ditmoe.models.moe import Assignment, MoE, Router  # noqa: E402
from tolerances import assert_close_fp32  # noqa: E402

D, E, K, H, S = 16, 4, 2, 24, 32

# The official layer against the package's (fp32, other loops and summation orders) or the float64
# reference: the longest reduction is the shared expert's S = 32 (the 30 to 64 tokens of a weight
# gradient are fewer); the forward chains three (expert in, expert out, the weighted sum of slots
# and shared expert), a backward twice that (tolerances.py).
MOE_K, MOE_CHAIN = S, 3
# The router's gradient: forward gate product, softmax, top-k weights, expert in and out; backward
# g . expert output, the weights' and the softmax's backward, the dW sum over tokens: at most 9.
GATE_GRAD_CHAIN = 9
# The balance loss: gate product, softmax, means over the 30 tokens, the 4-term sum of f_i * P_i,
# and the roundings of f_i (exact counts, one division) and of the alpha product as one more step.
AUX_K, AUX_CHAIN = 30, 5


def make_pair(tp: int = 2, seed: int = 0) -> tuple[MoE, OfficialMoE]:
    torch.manual_seed(seed)
    pkg = kernels.apply(MoE(D, E, K, H, S))  # the layer the benchmarks time
    return pkg, official_from_package(pkg, tp)


def reference(off: OfficialMoE, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Token by token in float64 from the official modules' weights: sum_k w_k E_k(x) + S(x)."""

    def swiglu(m, v):
        return F.linear(F.silu(F.linear(v, m.gate_proj.weight.double())) * F.linear(v, m.up_proj.weight.double()),
                        m.down_proj.weight.double())

    flat = x.reshape(-1, x.shape[-1]).double()
    out = torch.zeros_like(flat)
    for t in range(flat.shape[0]):
        for slot in range(idx.shape[1]):
            out[t] += w[t, slot].double() * swiglu(off.experts[int(idx[t, slot])], flat[t])
    out += swiglu(off.shared_experts, flat)
    return out.view(x.shape)


class PlantedPackageGate(Router):
    def __init__(self, idx, w):
        super().__init__(E)
        self.idx, self.w = idx, w

    def forward(self, x, cond=None):
        return Assignment.top_k(self.idx, self.w, torch.full((x.shape[0], E), 1.0 / E))


class PlantedOfficialGate(torch.nn.Module):
    def __init__(self, idx, w):
        super().__init__()
        self.idx, self.w = idx, w

    def forward(self, x):
        return self.idx, self.w, None


def routing(pattern: str, t: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    if pattern == "random":
        return torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(t)])
    if pattern == "one_expert_gets_all":  # expert 3 in every token's first slot; expert 1 never used
        return torch.stack([torch.tensor([3, 0 if i % 2 else 2]) for i in range(t)])
    return torch.stack([torch.tensor([1, 3]) if i % 2 else torch.tensor([3, 1]) for i in range(t)])  # 0, 2 empty


@pytest.mark.parametrize("tp", [1, 2])
def test_training_path_matches_package_and_reference(tp):
    """Natural (random-weight) routing: output, balance loss and every gradient."""
    pkg, off = make_pair(tp)
    x = torch.randn(3, 10, D)
    xp, xo = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y_p, aux_p = pkg(xp, return_aux=True)
    y_o = off(xo)
    a = pkg.gate(x.reshape(-1, D))
    idx, w = a.expert_ids, a.weights
    assert_close_fp32(y_o, y_p, MOE_K, MOE_CHAIN, "official vs package")
    assert_close_fp32(y_o, reference(off, x, idx, w), MOE_K, MOE_CHAIN, "official vs float64 reference")
    assert_close_fp32(off.last_aux, aux_p, AUX_K, AUX_CHAIN, "balance loss")  # positive terms: no cancellation

    g = torch.randn_like(y_p)
    torch.autograd.backward([y_p, aux_p], [g, torch.ones_like(aux_p)])
    y_o.backward(g)  # the balance-loss gradient arrives through AddAuxiliaryLoss
    # Two fp32 backward passes in different orders: MOE_K, twice the forward chain (the router's: GATE_GRAD_CHAIN).
    assert_close_fp32(xo.grad, xp.grad, MOE_K, 2 * MOE_CHAIN, "x")
    assert_close_fp32(off.gate.weight.grad, pkg.gate.weight.grad, MOE_K, GATE_GRAD_CHAIN, "gate")
    for i, ex in enumerate(off.experts):
        assert_close_fp32(ex.gate_proj.weight.grad.t(), pkg.experts.w_in.grad[i, :, :H], MOE_K, 2 * MOE_CHAIN, f"gate_proj {i}")
        assert_close_fp32(ex.up_proj.weight.grad.t(), pkg.experts.w_in.grad[i, :, H:], MOE_K, 2 * MOE_CHAIN, f"up_proj {i}")
        assert_close_fp32(ex.down_proj.weight.grad.t(), pkg.experts.w_out.grad[i], MOE_K, 2 * MOE_CHAIN, f"down_proj {i}")
    assert_close_fp32(off.shared_experts.gate_proj.weight.grad, pkg.shared_experts.gate_proj.weight.grad,
                      MOE_K, 2 * MOE_CHAIN, "shared gate_proj")


@pytest.mark.parametrize("training", [True, False], ids=["train_path", "moe_infer"])
@pytest.mark.parametrize("pattern", ["random", "one_expert_gets_all", "some_experts_empty"])
def test_planted_routing_both_paths(training, pattern):
    pkg, off = make_pair()
    x = torch.randn(3, 10, D)
    idx = routing(pattern, 30)
    w = torch.rand(idx.shape, generator=torch.Generator().manual_seed(2)) + 0.1
    pkg.gate, off.gate = PlantedPackageGate(idx, w), PlantedOfficialGate(idx, w)
    pkg.train(training), off.train(training)
    with torch.no_grad():
        y_p, y_o = pkg(x), off(x)
    assert_close_fp32(y_o, y_p, MOE_K, MOE_CHAIN, "official vs package")  # MOE_K, MOE_CHAIN: as above
    assert_close_fp32(y_o, reference(off, x, idx, w), MOE_K, MOE_CHAIN, "official vs float64 reference")


def test_inference_path_natural_routing():
    pkg, off = make_pair()
    pkg.eval(), off.eval()
    x = torch.randn(4, 16, D)
    with torch.no_grad():
        y_o, y_p = off(x), pkg(x)
        a = pkg.gate(x.reshape(-1, D))
    idx, w = a.expert_ids, a.weights
    assert_close_fp32(y_o, y_p, MOE_K, MOE_CHAIN, "official vs package")  # MOE_K, MOE_CHAIN: as above
    assert_close_fp32(y_o, reference(off, x, idx, w), MOE_K, MOE_CHAIN, "official vs float64 reference")
    assert off.gate(x)[2] is None  # no balance loss outside training, as the official gate


def test_officialized_model_matches_package_model():
    sys.path.insert(0, str(BENCH))
    import moe_bench

    torch.manual_seed(0)
    pkg = create_model("debug")
    moe_bench.randomize_zero_init(pkg)
    import copy

    off = officialize(copy.deepcopy(pkg))
    assert all(isinstance(b.moe, OfficialMoE) for b in off.blocks)
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3) * 999, torch.tensor([1, 2, 10])
    entries = moe_bench.model_parity(pkg, off, x, t, y)
    assert {e["what"] for e in entries} == {"model eval forward", "model train forward", "model balance losses"}
    for e in entries:
        assert e["pass"], e
    with torch.no_grad():
        out = pkg.eval()(x, t, y)
    assert out.abs().max() > 1e-3  # the zero-initialised output layers were randomised: a real check


def test_bound_does_the_activated_flops():
    b = DenseBound(D, K, H, S)
    assert sum(p.numel() for p in b.parameters()) == K * 3 * D * H + 3 * D * S
    assert b(torch.randn(2, 5, D)).shape == (2, 5, D)


def test_official_swiglu_tp_split_is_the_plain_swiglu():
    torch.manual_seed(0)
    a = official_moe.OfficialSwiGLU(D, H, tp=2)
    b = official_moe.OfficialSwiGLU(D, H, tp=1)
    b.load_state_dict(a.state_dict())
    x = torch.randn(7, D)
    # Two fp32 evaluations: the tp split sums the H = 24 products of down_proj as two halves; two
    # chained products (in, out), K = H.
    assert_close_fp32(a(x), b(x), H, 2, "tp=2 vs tp=1")


def test_compile_failure_is_recorded_not_raised(monkeypatch):
    import torch._dynamo

    import moe_bench

    def broken(*a, **k):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(torch._dynamo, "explain", broken)
    args = moe_bench.parse_args(["--quick", "--device", "cpu", "--only", "compile"])
    out = moe_bench.bench_compile(args, torch.device("cpu"), moe_bench.Checks())
    assert "no compiler here" in out["error"] and "no compiler here" in out["explain_error"]
    report = {"device": {"description": "test", "slug": "t"}, "timestamp": "now", "command": "cmd", "quick": True,
              "repeats": 1, "warmup": 1, "settings": {"official_tp": 2}, "results": {"compile": out}, "checks": []}
    assert "torch.compile failed: `RuntimeError: no compiler here`" in moe_bench.render_section(report)


def test_a_run_of_some_benchmarks_does_not_replace_the_whole_record():
    import moe_bench

    assert not moe_bench.parse_args(["--device", "cpu"]).partial
    assert not moe_bench.parse_args(["--device", "cpu", "--only", "layer,train,sample,memory,compile"]).partial
    assert moe_bench.parse_args(["--device", "cpu", "--only", "train"]).partial
    assert moe_bench.parse_args(["--device", "cuda", "--only", "layer,train,sample,memory,compile"]).partial  # no mfu


def test_layer_batches_parse_and_bad_ones_are_refused(capsys):
    import moe_bench

    assert moe_bench.parse_args(["--device", "cpu"]).batch == [8, 16]  # 16: the training step's batch
    assert moe_bench.parse_args(["--device", "cuda"]).batch == [32]
    assert moe_bench.parse_args(["--device", "cpu", "--batch", "4,12"]).batch == [4, 12]
    for bad in ("eight", "0", ","):
        with pytest.raises(SystemExit):
            moe_bench.parse_args(["--device", "cpu", "--batch", bad])
        assert "--batch" in capsys.readouterr().err


def test_docs_section_is_replaced_between_markers(tmp_path):
    import moe_bench

    doc = tmp_path / "performance.md"
    doc.write_text("# Performance\n\nhand-written text\n")
    report = {"device": {"description": "machine A", "slug": "a"}, "timestamp": "t1", "command": "cmd one",
              "quick": False, "repeats": 1, "warmup": 1, "settings": {"official_tp": 2}, "results": {}, "checks": []}
    moe_bench.update_docs(doc, report)
    report["command"] = "cmd two"
    moe_bench.update_docs(doc, report)
    text = doc.read_text()
    assert "hand-written text" in text and "cmd two" in text and "cmd one" not in text
    assert text.count("<!-- moe_bench:begin a -->") == 1


def test_quick_run_writes_json(tmp_path):
    out = tmp_path / "quick.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    cmd = [sys.executable, str(BENCH / "moe_bench.py"), "--quick", "--device", "cpu",
           "--only", "layer,train,sample,memory", "--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rep = json.loads(out.read_text())
    assert rep["complete"] and rep["quick"]
    for key in ("device", "command", "results", "checks", "settings", "targets"):
        assert key in rep
    assert set(rep["results"]) == {"layer", "train", "sample", "memory"}
    layer = next(iter(rep["results"]["layer"].values()))
    assert {"official fp32", "package fp32", "bound fp32", "package bf16", "bound bf16"} <= set(layer["times"])
    assert all("median_ms" in v for v in layer["times"].values())
    assert "official fp32" in rep["results"]["train"]["times"]
    assert "official fp32" in rep["results"]["sample"]["times"]
    assert all("step_peak_mb" in c for c in rep["results"]["memory"]["contenders"].values())
    parity = [c for c in rep["checks"] if c["name"].startswith("parity")]
    assert parity and all(c["pass"] for c in parity)
    assert "PASS" in p.stdout or "MISS" in p.stdout
    assert not (ROOT / "benchmarks" / "results" / "quick.json").exists()
