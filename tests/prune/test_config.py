"""PruningConfig validation (FAULTS 13), pattern strings, per-layer checks on shapes (FAULTS 11)."""

import pytest

from calibra.prune import (
    NM,
    Block,
    Cubic,
    Gradual,
    JointQuant,
    OneShot,
    PruneMethod,
    PruningConfig,
    Unstructured,
    parse_pattern,
)


def test_pattern_strings():
    assert parse_pattern("unstructured") == Unstructured()
    assert parse_pattern("2:4") == NM(2, 4)
    assert parse_pattern(" 4:8 ") == NM(4, 8)
    assert parse_pattern("1:4") == NM(1, 4)
    assert parse_pattern("block:16x8") == Block(16, 8)
    assert parse_pattern("BLOCK:4") == Block(4, 4)
    assert str(NM(2, 4)) == "2:4" and str(Block(16, 8)) == "block:16x8"


@pytest.mark.parametrize(
    "spec,match",
    [
        ("dense", "unknown pattern"),
        ("4:4", "0 < n < m"),
        ("0:4", "0 < n < m"),
        ("2:64", "m <= 32"),
        ("block:0x4", "block rows"),
        ("block:1x1", "unstructured"),
        ("block:4096", r"\[1, 1024\]"),
        (24, "string"),
    ],
)
def test_bad_patterns(spec, match):
    with pytest.raises(ValueError, match=match):
        PruningConfig(pattern=spec).validate()


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(target_sparsity=0.0), "target_sparsity"),
        (dict(target_sparsity=1.0), "target_sparsity"),
        (dict(target_sparsity=-0.1), "target_sparsity"),
        (dict(target_sparsity=1.5), "target_sparsity"),
        (dict(target_sparsity=None), "target_sparsity"),
        (dict(target_sparsity="half"), "target_sparsity"),
        (dict(method="obs"), "method must be one of"),
        (dict(scope="column"), "scope"),
        (dict(magnitude_score="l3"), "magnitude_score"),
        (dict(block_size=0), "block_size"),
        (dict(block_size=8192), "block_size"),
        (dict(damp_percent=0.0), "damp_percent"),
        (dict(damp_percent=2.0), "damp_percent"),
        (dict(damp_ladder=(0.5, 0.1)), "damp_ladder"),
        (dict(pattern="2:4", target_sparsity=0.7), "fixes the sparsity at 0.5"),
        (dict(quantize=JointQuant(4, 128)), "runs inside SparseGPT"),
        (dict(method="sparsegpt", quantize=JointQuant(bits=9)), "bits"),
        (dict(method="sparsegpt", quantize=JointQuant(group_size=0)), "group_size"),
        (dict(schedule=Gradual(start_step=10, end_step=5)), "end_step > start_step"),
        (dict(schedule=Cubic(initial_sparsity=0.6, final_sparsity=0.5)), "final_sparsity >= initial"),
        (dict(schedule=Cubic(final_sparsity=0.3)), "schedule ends at sparsity 0.3"),
        (dict(schedule=Gradual(frequency=0)), "frequency"),
        (dict(pattern="2:4", target_sparsity=None, schedule=Cubic()), "cannot ramp up"),
        (dict(pattern="2:4", target_sparsity=None, gradual_steps=3), "gradual_steps"),
        (dict(gradual_steps=0), "gradual_steps"),
    ],
)
def test_validate_rejects(kw, match):
    """FAULTS 13: out-of-range settings raise ValueError from validate(), which needs no weights."""
    with pytest.raises(ValueError, match=match) as e:
        PruningConfig(**kw).validate()
    assert str(e.value).startswith("[prune]")


def test_defaults_and_derived():
    c = PruningConfig().validate()
    assert c.method_enum is PruneMethod.WANDA and c.resolved_scope == "row" and c.sparsity == 0.5
    assert PruningConfig(method="magnitude").resolved_scope == "layer"
    nm = PruningConfig(method="sparsegpt", pattern="4:8", target_sparsity=None).validate()
    assert nm.sparsity == 0.5
    assert PruningConfig(pattern="1:4", target_sparsity=0.75).validate().sparsity == 0.75
    assert PruningConfig(method=PruneMethod.SPARSEGPT).validate().method_enum is PruneMethod.SPARSEGPT
    assert PruningConfig(target_sparsity=0.6, schedule=Cubic()).resolved_schedule().final_sparsity == 0.6
    assert PruningConfig(target_sparsity=0.6).resolved_schedule() == OneShot(0, 0.6)


def test_requires_calibration():
    assert not PruningConfig(method="magnitude").requires_calibration()
    assert PruningConfig(method="wanda").requires_calibration()
    assert PruningConfig(method="sparsegpt").requires_calibration()


def test_calibration_spec_is_validated():
    class Spec:
        def validate(self):
            raise ValueError("[data] num_samples must be >= 1")

    with pytest.raises(ValueError, match=r"\[data\]"):
        PruningConfig(calibration=Spec()).validate()


SHAPES = {
    "model.layers.0.mlp.down_proj": (64, 1002),
    "model.layers.0.mlp.up_proj": (1000, 64),
    "model.layers.1.self_attn.o_proj": (64, 64),
    "model.layers.1.mlp.down_proj": (64, 250),
}


def test_indivisible_layers_listed_all_at_once():
    """FAULTS 11: every layer the pattern cannot take is named in one error, from shapes alone."""
    with pytest.raises(ValueError) as e:
        PruningConfig(pattern="4:8", target_sparsity=None).plan_layers(SHAPES)
    msg = str(e.value)
    assert "2 layer(s)" in msg and "model.layers.0.mlp.down_proj" in msg and "model.layers.1.mlp.down_proj" in msg
    assert "1002" in msg and "250" in msg and "skip_indivisible" in msg
    assert "up_proj" not in msg


def test_indivisible_layers_left_dense_when_asked():
    cfg = PruningConfig(pattern="4:8", target_sparsity=None, skip_indivisible=True)
    prune, dense = cfg.plan_layers(SHAPES)
    assert prune == ["model.layers.0.mlp.up_proj", "model.layers.1.self_attn.o_proj"]
    assert set(dense) == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    assert "divisible by 8" in dense["model.layers.1.mlp.down_proj"]


def test_block_and_group_layer_checks():
    blk = PruningConfig(pattern="block:16x8")
    assert blk.layer_problem("a", 64, 64) is None
    assert "out_features divisible by 16" in blk.layer_problem("a", 40, 64)
    assert "in_features by 8" in blk.layer_problem("a", 64, 60)
    joint = PruningConfig(method="sparsegpt", quantize=JointQuant(4, 128))
    assert "group_size 128 does not divide in_features 192 (layer a)" in joint.layer_problem("a", 64, 192)
    assert PruningConfig(pattern="unstructured").plan_layers(SHAPES)[1] == {}
