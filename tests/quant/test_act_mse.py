"""calibra.quant.act_mse: the MSE observer keeps, per input, the shrink factor whose quantize-dequantize has
the least squared error on the inputs it saw (checked by brute force), never worse than absmax; the scales
are the deployed ones; experts without tokens keep the recorded fallback."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from calibra.quant.act_mse import SHRINK_GRID, candidate_scales, choose_shrink
from calibra.quant.activations import static_input_quant, static_scale
from calibra.quant.fp8 import fp8_fake_quant
from calibra.quant.int8 import int8_fake_quant


class _Runner:
    """A LayerRunner stand-in: ``collect`` feeds each key's batches to the attached observers."""

    def __init__(self, batches: dict[str, list[torch.Tensor]]):
        self.batches, self.observers, self.calls = batches, ["ranges-and-hessian"], []

    def collect(self, index, layer, modules=None):
        self.calls.append((index, modules, list(self.observers)))
        for key, xs in self.batches.items():
            if modules is None or key in modules:
                for x in xs:
                    for o in self.observers:
                        o.linear(key, x)


def _stats(batches):
    tensors, counts = {}, {}
    for key, xs in batches.items():
        x = torch.cat(xs) if xs else None
        if x is not None and x.shape[0]:
            tensors[f"ranges/min/{key}"], tensors[f"ranges/max/{key}"] = x.amin(0), x.amax(0)
        counts[key] = 0 if x is None else x.shape[0]
    return SimpleNamespace(tensors=tensors, count=lambda kind, key: counts.get(key, 0))


def _data():
    g = torch.Generator().manual_seed(0)
    # heavy tails: the few largest inputs stretch an int8 grid scaled to them more than clipping them costs
    heavy = torch.randn(200, 32, generator=g) / torch.rand(200, 32, generator=g).clamp(min=0.02)
    gauss = torch.randn(200, 32, generator=g)
    return {"m.q": [heavy[:120], heavy[120:]], "m.o": [gauss[:50], gauss[50:]]}


@pytest.mark.parametrize("fmt,fq", [("int8", int8_fake_quant), ("fp8", fp8_fake_quant)])
def test_kept_shrink_is_the_brute_force_minimum(fmt, fq):
    batches = _data()
    stats = _stats(batches)
    targets = [SimpleNamespace(name=k, stats_key=k, expert=False) for k in batches]
    runner = _Runner(batches)
    kept, errors = choose_shrink(runner, 0, None, stats, targets, torch.float32, fmt)
    assert runner.observers == ["ranges-and-hessian"]  # the job's observers are back
    assert len(runner.calls) == 1 and len(runner.calls[0][2]) == 1  # one pass with the error observer only
    for key, xs in batches.items():
        x = torch.cat(xs)
        amax = x.abs().max()
        brute = [
            float(((fq(x, static_scale(amax * p, torch.float32, fmt)) - x).double() ** 2).sum()) for p in SHRINK_GRID
        ]
        best = SHRINK_GRID[min(range(len(brute)), key=brute.__getitem__)]
        assert kept[key] == best
        assert errors[key][f"{best:g}"] <= errors[key]["1"]  # never worse than absmax on its measure
        assert errors[key]["1"] == pytest.approx(brute[0], rel=1e-9)
    if fmt == "int8":
        assert kept["m.q"] < 1.0  # clipped where it measurably lowers the error
    iq = static_input_quant(stats, targets, torch.float32, format=fmt, shrink=kept)
    for key in batches:
        amax = torch.cat(batches[key]).abs().max()
        assert (
            torch.equal(iq[key].scale, static_scale(amax * kept[key], torch.float32, fmt)) and iq[key].clip == kept[key]
        )
        assert iq[key].to_dict()["clip"] == kept[key]


def test_candidates_are_the_deployed_scales():
    amax = torch.tensor(3.3)
    c = candidate_scales(amax, torch.bfloat16, "fp8")
    assert c.dtype == torch.bfloat16 and c.numel() == len(SHRINK_GRID) and SHRINK_GRID[0] == 1.0
    assert torch.equal(c[:1], static_scale(amax, torch.bfloat16, "fp8"))


def test_expert_without_tokens_keeps_a_recorded_fallback():
    g = torch.Generator().manual_seed(1)
    blk = "m.mlp.experts"
    batches = {f"{blk}.0.down_proj": [torch.randn(40, 16, generator=g) * 2], f"{blk}.1.down_proj": []}
    stats = _stats(batches)
    targets = [SimpleNamespace(name=k, stats_key=k, expert=True) for k in batches]
    kept, _ = choose_shrink(_Runner(batches), 0, None, stats, targets, torch.float32, "int8")
    assert set(kept) == {f"{blk}.0.down_proj"}
    iq = static_input_quant(stats, targets, torch.float32, format="int8", shrink=kept)
    fb = iq[f"{blk}.1.down_proj"]
    assert fb.fallback and fb.clip is None and "clip" not in fb.to_dict()
    assert torch.equal(fb.scale, iq[f"{blk}.0.down_proj"].scale)  # the block's largest clipped range
    assert torch.isfinite(fb.scale).all() and float(fb.scale) > 0
