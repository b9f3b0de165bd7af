"""The --precision rule (ditmoe.precision) and the CPU description it rests on (ditmoe.hardware)."""

import json
import re

import pytest
import torch

from ditmoe.hardware import CPU_FLAGS, CpuInfo, cpu_info, parse_cpuinfo
from ditmoe.precision import (
    BF16_MARGIN,
    ProbeShape,
    decide,
    decide_cpu,
    probe_cpu,
    probe_shape,
    resolve_precision,
)
from ditmoe.registry import get_config

MNIST = get_config("DiT-MoE-mnist")  # D = 128
S2 = get_config("DiT-MoE-S/2-8E2A")  # D = 384


def fake_cpu(*flags: str, name: str = "Fake CPU 9000") -> CpuInfo:
    return CpuInfo(model_name=name, flags={f: f in flags for f in CPU_FLAGS}, cores=2, torch="9.9.9",
                   capability="AVX512", flags_source="test")


AMX = fake_cpu("amx_bf16", "amx_tile", "avx512_bf16", "avx512f", "avx2", name="Fake Xeon AMX")
ZEN4 = fake_cpu("avx512_bf16", "avx512f", "avx2", name="Fake EPYC Zen 4")
NO_BF16 = fake_cpu("avx2", name="Fake EPYC Zen 3")


class CountingProbe:
    """A probe that reports planted timings and counts its calls."""

    def __init__(self, fp32_ms: float, bf16_ms: float):
        self.timings = {"fp32_ms": fp32_ms, "bf16_ms": bf16_ms}
        self.shapes: list[ProbeShape] = []

    def __call__(self, shape: ProbeShape) -> dict:
        self.shapes.append(shape)
        return dict(self.timings)


def never_probe(shape):
    raise AssertionError("the probe ran where the flags decide")


# ---------------------------------------------------------------------------------------- hardware
CPUINFO_AMX = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8

processor\t: 1
model name\t: something else
flags\t\t: fpu
"""


def test_parse_cpuinfo_reads_the_first_processor():
    name, flags = parse_cpuinfo(CPUINFO_AMX)
    assert name == "Intel(R) Xeon(R) Platinum 8480+"
    assert {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"} <= flags and "fpu" in flags
    info = cpu_info(CPUINFO_AMX)
    assert info.model_name == "Intel(R) Xeon(R) Platinum 8480+" and info.flags_source == "/proc/cpuinfo"
    assert info.flags == {f: True for f in CPU_FLAGS}
    assert info.native_bf16 and info.flag_string() == "amx_bf16,amx_tile,avx512_bf16,avx512f,avx2"


def test_cpu_info_without_flags_line_asks_torch():
    # an ARM /proc/cpuinfo: "Features", no "flags" and no "model name"
    info = cpu_info("processor\t: 0\nFeatures\t: fp asimd\nCPU implementer\t: 0x41\n")
    assert info.flags_source == "torch"
    assert set(info.flags) == set(CPU_FLAGS) and info.model_name
    assert info.torch == torch.__version__ and info.cores >= 1


def test_cpu_info_of_this_machine_is_json_ready():
    d = cpu_info().as_dict()
    assert json.loads(json.dumps(d)) == d
    assert {"model_name", "flags", "cores", "torch"} <= set(d) and set(d["flags"]) == set(CPU_FLAGS)


# ---------------------------------------------------------------------------------- explicit values
@pytest.mark.parametrize("device", ["cpu", "cuda", "meta"])
def test_explicit_values_pass_through(device):
    assert resolve_precision("fp32", device, S2) is None
    assert resolve_precision("bf16", device, MNIST) is torch.bfloat16
    assert resolve_precision("fp16", device, MNIST) is torch.float16
    with pytest.raises(ValueError, match="precision 'fp64'"):
        resolve_precision("fp64", device, MNIST)


def test_auto_on_other_devices_is_fp32():
    assert resolve_precision("auto", "meta", S2) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_on_cuda_is_half_precision():
    assert resolve_precision("auto", "cuda", MNIST) in (torch.bfloat16, torch.float16)


# ------------------------------------------------------------------------------------ auto on CPU
@pytest.mark.parametrize("model", [MNIST, S2])
def test_no_bf16_instructions_means_fp32_without_probing(model, tmp_path):
    d = decide("auto", "cpu", model, cpu=NO_BF16, probe=never_probe, cache=tmp_path / "p.json")
    assert d.dtype is None and d.source == "no-bf16-flags"
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize("fp32_ms, bf16_ms, expected", [
    (100.0, 50.0, torch.bfloat16),  # clearly faster
    (100.0, 100.0 * BF16_MARGIN + 1, None),  # faster, but within the margin
    (100.0, 300.0, None),  # slower
])
def test_probe_decision_follows_timings(fp32_ms, bf16_ms, expected, tmp_path):
    probe = CountingProbe(fp32_ms, bf16_ms)
    d = decide("auto", "cpu", S2, cpu=ZEN4, probe=probe, cache=tmp_path / "p.json", use_probe=True)
    assert d.dtype is expected and d.source == "probe"
    assert (d.fp32_ms, d.bf16_ms) == (fp32_ms, bf16_ms)
    assert probe.shapes == [probe_shape(S2)]


def test_cached_result_is_reused_without_probing(tmp_path):
    cache = tmp_path / "sub" / "precision.json"
    probe = CountingProbe(100.0, 40.0)
    first = decide_cpu(S2, cpu=AMX, probe=probe, cache=cache, use_probe=True)
    assert first.dtype is torch.bfloat16 and first.source == "probe" and len(probe.shapes) == 1
    entries = json.loads(cache.read_text())["entries"]
    assert list(entries) == [first.key]
    for part in ("Fake Xeon AMX", "amx_bf16", "torch 9.9.9", "D384"):
        assert part in first.key
    # the same machine and shape: the cache answers, even where the probe would now disagree
    probe.timings = {"fp32_ms": 100.0, "bf16_ms": 500.0}
    again = decide_cpu(S2, cpu=AMX, probe=probe, cache=cache, use_probe=True)
    assert again.dtype is torch.bfloat16 and again.source == "cache" and len(probe.shapes) == 1
    # another width, another CPU model or another thread count: measured anew, both entries kept
    assert decide_cpu(MNIST, cpu=AMX, probe=probe, cache=cache, use_probe=True).source == "probe"
    other = fake_cpu(*[f for f, v in AMX.flags.items() if v], name="Another Xeon")
    assert decide_cpu(S2, cpu=other, probe=probe, cache=cache, use_probe=True).source == "probe"
    assert decide_cpu(S2, cpu=AMX, probe=probe, cache=cache, use_probe=True, threads=64).source == "probe"
    assert len(probe.shapes) == 4 and len(json.loads(cache.read_text())["entries"]) == 4


def test_unwritable_cache_still_decides(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cache = blocker / "precision.json"  # its parent is a file: neither root nor anyone can create it
    probe = CountingProbe(100.0, 30.0)
    for _ in range(3):
        d = decide_cpu(S2, cpu=ZEN4, probe=probe, cache=cache, use_probe=True)
        assert d.dtype is torch.bfloat16 and d.source == "probe" and d.bf16_ms == 30.0
    assert len(probe.shapes) == 1  # measured once: the process remembers what it could not store
    assert blocker.read_text() == "not a folder" and [p.name for p in tmp_path.iterdir()] == ["a-file"]


def test_corrupt_cache_is_replaced(tmp_path):
    cache = tmp_path / "precision.json"
    cache.write_text("{ half a file")
    probe = CountingProbe(100.0, 200.0)
    assert decide_cpu(S2, cpu=ZEN4, probe=probe, cache=cache, use_probe=True).dtype is None
    assert len(json.loads(cache.read_text())["entries"]) == 1


def test_default_cache_follows_ditmoe_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DITMOE_CACHE", str(tmp_path))
    probe = CountingProbe(100.0, 50.0)
    assert resolve_precision("auto", "cpu", S2, cpu=ZEN4, probe=probe, use_probe=True) is torch.bfloat16
    assert resolve_precision("auto", "cpu", S2, cpu=ZEN4, probe=probe, use_probe=True) is torch.bfloat16
    assert len(probe.shapes) == 1 and (tmp_path / "precision.json").is_file()


def test_probe_env_off_uses_the_flag_rule(tmp_path, monkeypatch):
    monkeypatch.setenv("DITMOE_PRECISION_PROBE", "0")
    kw = dict(probe=never_probe, cache=tmp_path / "p.json")
    assert decide("auto", "cpu", S2, cpu=AMX, **kw).dtype is torch.bfloat16
    assert decide("auto", "cpu", MNIST, cpu=AMX, **kw).dtype is None
    assert decide("auto", "cpu", S2, cpu=ZEN4, **kw).dtype is None
    assert all(decide("auto", "cpu", m, cpu=AMX, **kw).source == "rule" for m in (S2, MNIST))
    assert not (tmp_path / "p.json").exists()


def test_sync_ranks_without_process_group_decides_locally(tmp_path):
    probe = CountingProbe(100.0, 50.0)
    got = resolve_precision("auto", "cpu", S2, sync_ranks=True, cpu=ZEN4, probe=probe, cache=tmp_path / "p.json",
                            use_probe=True)
    assert got is torch.bfloat16 and len(probe.shapes) == 1


# ---------------------------------------------------------------------------------------- the probe
def test_probe_shape_follows_the_model():
    mnist, s2 = probe_shape(MNIST), probe_shape(S2)
    assert (mnist.width, mnist.heads, mnist.tokens) == (128, 4, 16)
    assert mnist.mlp_width == 2 * 256 + 128  # top-2 routed experts + the shared expert
    assert (s2.width, s2.heads, s2.tokens, s2.mlp_width) == (384, 6, 256, 2 * 1536 + 768)
    xl = probe_shape(get_config("DiT-MoE-XL/2-8E2A"))  # capped width, same head size and MLP ratio
    assert xl.width < 1152 and xl.width % (1152 // 16) == 0 and xl.mlp_width * 1152 == xl.width * (2 * 4608 + 2304)
    for s in (mnist, s2, xl):
        assert s.tokens * s.images >= 256 and s.flops() < 2e10


def test_probe_reports_the_timer_intervals():
    # fp32 steps take 10 ms, bf16 steps 4 ms; the steps alternate fp32, bf16 after two warm-ups
    ticks = iter([0.0, 0.010, 1.0, 1.004, 2.0, 2.010, 3.0, 3.004, 4.0, 4.012, 5.0, 5.004])
    tiny = ProbeShape(width=16, heads=2, mlp_width=32, tokens=8, images=2)
    got = probe_cpu(tiny, repeats=3, timer=lambda: next(ticks))
    assert got["fp32_ms"] == pytest.approx(10.0) and got["bf16_ms"] == pytest.approx(4.0)
    with pytest.raises(StopIteration):
        next(ticks)  # every tick used: one timed step per precision and repeat


def test_real_probe_runs():
    tiny = ProbeShape(width=32, heads=2, mlp_width=64, tokens=16, images=2)
    got = probe_cpu(tiny, repeats=1)
    assert got["fp32_ms"] > 0 and got["bf16_ms"] > 0


def test_cli_prints_the_decision(capsys):
    from ditmoe.precision import main

    main(["DiT-MoE-mnist", "--device", "meta"])
    out = capsys.readouterr().out
    assert re.search(r"^CPU: .+ torch ", out, re.M)
    assert "DiT-MoE-mnist (D=128, 16 tokens): auto = fp32 [device]" in out


def test_trainer_choice_delegates():
    from ditmoe.train.loop import choose_precision

    assert choose_precision("bf16", torch.device("cpu"), MNIST) is torch.bfloat16
    assert choose_precision("fp32", torch.device("cpu"), S2) is None
    assert choose_precision("auto", torch.device("meta"), S2) is None
    if not cpu_info().native_bf16:
        assert choose_precision("auto", torch.device("cpu"), S2) is None


def _sync_worker(rank: int, world: int, cache_root: str) -> None:
    from pathlib import Path

    # rank 0 would measure bf16 faster, rank 1 slower: the ranks must still agree, on rank 0's choice
    probe = CountingProbe(100.0, 50.0 if rank == 0 else 300.0)
    got = resolve_precision("auto", "cpu", S2, sync_ranks=True, cpu=ZEN4, probe=probe, use_probe=True,
                            cache=Path(cache_root) / f"rank{rank}.json")
    Path(cache_root, f"result{rank}.txt").write_text(f"{got} {len(probe.shapes)}")


def test_ranks_take_rank0_choice(tmp_path):
    from ditmoe.parallel.launch import spawn_local

    spawn_local(_sync_worker, 2, str(tmp_path))
    assert (tmp_path / "result0.txt").read_text() == "torch.bfloat16 1"
    assert (tmp_path / "result1.txt").read_text() == "torch.bfloat16 0"  # rank 1 never probed


def test_benchmark_results_record_the_cpu(monkeypatch):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import moe_bench

    dev = moe_bench.describe_device(torch.device("cpu"))
    assert dev["cpu"] == json.loads(json.dumps(cpu_info().as_dict()))
    assert dev["name"] == cpu_info().model_name and cpu_info().flag_string() in dev["description"]
    monkeypatch.setenv("DITMOE_PRECISION_PROBE", "0")  # no timing, no cache written
    auto = moe_bench.describe_precision(torch.device("cpu"), "DiT-MoE-mnist")
    assert auto["model"] == "DiT-MoE-mnist" and auto["dtype"] in ("fp32", "bf16") and auto["reason"]
