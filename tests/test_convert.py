"""Checkpoint conversion, safe loading, mismatch diagnostics and dense -> MoE upcycling."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import ditmoe
from ditmoe.cli import main
from ditmoe.convert import (CheckpointMismatchError, load_into, load_model, load_official, read_state_dict, save_model,
                            upcycle)
from conftest import FIXTURES
from tolerances import TINY_DIT_CHAIN, TINY_DIT_K, assert_close_fp32, fp32_tol, rel_err


def _io(name):
    return load_file(str(FIXTURES / f"{name}_io.safetensors"))


@pytest.mark.parametrize("wrapper", [None, "ema", "model"])
def test_pt_checkpoints_with_or_without_wrapper(tmp_path, wrapper):
    sd, _ = read_state_dict(FIXTURES / "official_tiny_moe.safetensors")
    path = tmp_path / "ckpt.pt"
    torch.save({wrapper: sd, "opt": {"step": torch.tensor(3)}} if wrapper else sd, path)
    io = _io("official_tiny_moe")
    model = load_official(path, num_heads=4)
    with torch.no_grad():
        out = model(io["x"], io["t"], io["y"])
    # The official code's fp32 output from another CPU: the tiny DiT's chain of fp32 reductions (tolerances.py).
    assert_close_fp32(out, io["out_eval"], TINY_DIT_K, TINY_DIT_CHAIN)


def test_unsafe_pickle_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    path = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, path)
    with pytest.raises(ValueError, match="weights-only"):
        read_state_dict(path)


def test_cli_convert_round_trip(tmp_path):
    pkg = tmp_path / "tiny.safetensors"
    back = tmp_path / "tiny_official.safetensors"
    assert main(["convert", str(FIXTURES / "official_tiny_moe.safetensors"), str(pkg)]) == 0
    assert json.loads((tmp_path / "tiny.json").read_text())["num_experts"] == 4
    assert main(["convert", str(pkg), str(back), "--to", "official"]) == 0
    original, _ = read_state_dict(FIXTURES / "official_tiny_moe.safetensors")
    again = load_file(str(back))
    assert again.keys() == original.keys()
    assert all(torch.equal(again[k], original[k]) for k in original)
    model = load_model(pkg)
    io = _io("official_tiny_moe")
    with torch.no_grad():  # the same weights through the same code in this process: bit for bit
        assert torch.equal(model(io["x"], io["t"], io["y"]), load_official(FIXTURES / "official_tiny_moe.safetensors")(io["x"], io["t"], io["y"]))


def test_mismatch_names_keys_shapes_and_fitting_model():
    sd, _ = read_state_dict(FIXTURES / "official_tiny_moe.safetensors")
    model = ditmoe.create_model("debug", num_experts=8)
    from ditmoe.convert import official_to_package

    with pytest.raises(CheckpointMismatchError) as e:
        load_into(model, official_to_package(sd))
    msg = str(e.value)
    assert "blocks.0.moe.gate.weight: checkpoint has shape (4, 64), model expects (8, 64)" in msg
    assert "'debug'" in msg  # the registry model that would fit


def test_mismatch_against_a_real_size_names_it():
    model = ditmoe.create_model("DiT-MoE-S/2-8E2A", device="meta")
    sd = {k: torch.zeros(v.shape) for k, v in ditmoe.create_model("debug").state_dict().items()}
    with pytest.raises(CheckpointMismatchError, match="x_embedder.proj.weight: checkpoint has shape"):
        load_into(model, sd)


def _dense_reference():
    return load_official(FIXTURES / "official_tiny_dense_dit.safetensors")


@pytest.mark.parametrize("shared_hidden", [0, 32])
def test_upcycled_model_reproduces_dense_output(shared_hidden):
    dense = _dense_reference()
    moe = upcycle(dense, num_experts=4, top_k=2, norm_topk=True, shared_hidden=shared_hidden)
    io = _io("official_tiny_dense_dit")
    with torch.no_grad():
        ref = dense(io["x"], io["t"], io["y"])
        out = moe(io["x"], io["t"], io["y"])
    assert moe.config.num_experts == 4 and moe.config.expert_type == "gelu"
    # Grouped expert products and the renormalised top-2 sum against the dense MLP, and both
    # against the official output: fp32 in other summation orders through the tiny DiT's chain.
    assert_close_fp32(out, ref, TINY_DIT_K, TINY_DIT_CHAIN, "upcycled vs dense")
    assert_close_fp32(out, io["out_eval"], TINY_DIT_K, TINY_DIT_CHAIN, "upcycled vs official")
    std = moe.blocks[0].moe.gate.weight.std().item()
    assert 0.01 < std < 0.03  # router drawn from N(0, 0.02)


def test_upcycle_without_renormalisation_differs_and_noise_breaks_symmetry():
    dense = _dense_reference()
    io = _io("official_tiny_dense_dit")
    raw = upcycle(dense, num_experts=4, top_k=2, norm_topk=False)
    with torch.no_grad():  # top-2 weights that sum below 1 shrink every MLP branch: far beyond fp32 rounding
        assert rel_err(raw(io["x"], io["t"], io["y"]), io["out_eval"]) > 100 * fp32_tol(TINY_DIT_K, TINY_DIT_CHAIN)
    noisy = upcycle(dense, num_experts=4, noise_std=0.01)
    w = noisy.blocks[0].moe.experts.w_in
    assert not torch.equal(w[0], w[1])


def test_cli_upcycle_from_official_dense_file(tmp_path):
    dst = tmp_path / "up.safetensors"
    assert main(["upcycle", str(FIXTURES / "official_tiny_dense_dit.safetensors"), str(dst), "--experts", "4"]) == 0
    model = load_model(dst)
    io = _io("official_tiny_dense_dit")
    with torch.no_grad():
        out = model(io["x"], io["t"], io["y"])
    # Expert products against the official dense output from another CPU: the tiny DiT's fp32 chain.
    assert_close_fp32(out, io["out_eval"], TINY_DIT_K, TINY_DIT_CHAIN)


def test_package_dense_swiglu_model_upcycles():
    torch.manual_seed(0)
    # eval(): in training mode the label embedding drops classes at random (class_dropout_prob).
    dense = ditmoe.create_model("debug-dense", dense_mlp_type="swiglu").eval()
    with torch.no_grad():
        for p in dense.parameters():
            p.normal_(0, 0.05)
    moe = upcycle(dense, num_experts=3, top_k=2)
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 900]), torch.tensor([1, 10])
    with torch.no_grad():  # "debug" has the fixtures' shape: the tiny DiT's fp32 chain in two summation orders
        assert_close_fp32(moe(x, t, y), dense(x, t, y), TINY_DIT_K, TINY_DIT_CHAIN)


def test_convert_keeps_flow_prediction_and_sampling_and_refuses_the_official_layout(tmp_path, capsys):
    from ditmoe.convert import load_model_and_info

    src = tmp_path / "data_pred.safetensors"
    save_model(ditmoe.create_model("debug", flow_prediction="data", learn_sigma=False), src,
               extra_meta={"process": "flow", "sampling": json.dumps({"sampler": "heun", "steps": 7, "cfg_scale": 3.0})})
    assert main(["convert", str(src), str(tmp_path / "copy.safetensors")]) == 0
    model, info = load_model_and_info(tmp_path / "copy.safetensors")
    assert model.config.flow_prediction == "data"
    assert info["sampling"] == {"sampler": "heun", "steps": 7, "cfg_scale": 3.0} and info["process"] == "flow"
    assert main(["convert", str(src), str(tmp_path / "official.safetensors"), "--to", "official"]) != 0
    assert "official code cannot run" in capsys.readouterr().err
    assert not (tmp_path / "official.safetensors").exists()
