"""The expert-weight cast cache of a sampling run: reused only while the weight is unchanged."""

import torch

from ditmoe.kernels.weight_casts import cast_weight, reuse_weight_casts
from ditmoe.registry import create_model
from ditmoe.samplers import sample


def test_cast_is_reused_within_the_block_and_dropped_after():
    w = torch.randn(4, 8)
    with torch.no_grad():
        assert cast_weight(w, torch.bfloat16) is not cast_weight(w, torch.bfloat16)  # no block: fresh casts
        with reuse_weight_casts():
            first = cast_weight(w, torch.bfloat16)
            assert cast_weight(w, torch.bfloat16) is first
            assert cast_weight(w, torch.float32) is w  # no cast needed, nothing cached
        with reuse_weight_casts():
            assert cast_weight(w, torch.bfloat16) is not first


def test_in_place_update_invalidates_the_cached_cast():
    w = torch.randn(4, 8)
    with torch.no_grad(), reuse_weight_casts():
        before = cast_weight(w, torch.bfloat16)
        w.mul_(2)  # as an EMA update or optimizer step would
        after = cast_weight(w, torch.bfloat16)
        assert after is not before
        torch.testing.assert_close(after, (w).bfloat16(), rtol=0, atol=0)


def test_no_cache_while_gradients_are_recorded():
    w = torch.randn(4, 8, requires_grad=True)
    with reuse_weight_casts():
        a = cast_weight(w, torch.bfloat16)
        assert a.requires_grad and cast_weight(w, torch.bfloat16) is not a


def test_sampling_casts_each_expert_weight_once_and_samples_the_same(monkeypatch):
    import contextlib

    import ditmoe.samplers as samplers
    from ditmoe import kernels
    from ditmoe.kernels import moe

    model = kernels.apply(create_model("debug").eval())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # adaLN-Zero starts at zero: make the blocks matter
    labels = torch.tensor([0, 1])
    noise = torch.randn(2, model.config.in_channels, model.config.input_size, model.config.input_size)
    casts = []
    monkeypatch.setattr(moe, "cast_weight", lambda w, dtype: casts.append(cast_weight(w, dtype)) or casts[-1])

    def run():
        casts.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = sample(model, "flow", "euler", 3, labels, 1.5, noise=noise)
        return out, len({id(c) for c in casts})

    cached, distinct_cached = run()
    monkeypatch.setattr(samplers, "reuse_weight_casts", contextlib.nullcontext)
    fresh, distinct_fresh = run()
    expert_weights = 2 * len(model.moe_layers())
    assert distinct_cached == expert_weights  # w_in and w_out of each layer, once for 3 steps
    assert distinct_fresh == 3 * expert_weights
    torch.testing.assert_close(cached, fresh, rtol=0, atol=0)
