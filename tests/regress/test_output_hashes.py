"""Every verb's output on the builtin models is byte-identical to what it was when the hashes in
``output_hashes.json`` were made (before the streaming layer pipeline, issue 17). A refactor of the job
skeleton must not change a single weight, code, scale, mask or statistic.

What is hashed: every tensor of every ``.safetensors`` file in the output (name, dtype, shape and bytes)
and calibra's own JSON manifests (``quantization.json``, ``pruning.json``, ``activation_ranges.json``...).
Files that carry package versions or timings (``report.json``, ``calibra_manifest.json``, ``config.json``,
model cards, tokenizer files) are not hashed.

Regenerate only on purpose, when a change is meant to alter results, and say why in the commit:
``CALIBRA_WRITE_HASHES=1 PYTHONPATH=python python -m pytest -q tests/regress/test_output_hashes.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import calibra  # noqa: E402
from calibra.assets import builtin_texts  # noqa: E402
from calibra.data import CalibrationConfig, CalibrationDataset  # noqa: E402
from calibra.prune.config import PruningConfig  # noqa: E402
from calibra.quant import GPTQConfig, MRGPTQConfig, RTNConfig  # noqa: E402

HASHES = Path(__file__).with_name("output_hashes.json")
CAL = dict(num_samples=8, sequence_length=128, seed=0)
SKIP = {"report.json", "calibra_manifest.json", "config.json", "generation_config.json", "README.md"}


def _cal():
    # The hashes were stored when plain "builtin" calibration meant the Python stdlib set, now builtin:code
    # (the default became the mixed-domain set, issue 21). The same texts under the name the outputs then
    # recorded ("builtin", in activation_ranges.json) reproduce those outputs byte for byte.
    old_default = CalibrationDataset(builtin_texts("code"), name="builtin")
    return CalibrationConfig(dataset=old_default, **CAL)


def _quantize(model, config, **kw):
    def run(out):
        calibra.quantize(model, config, _cal(), output=out, evaluate=False, progress=False, echo=None, **kw)

    return run


def _prune(model, config, **kw):
    def run(out):
        calibra.prune(model, config, _cal(), output=out, evaluate=False, progress=False, echo=None, **kw)

    return run


def _calibrate(model, observers):
    def run(out):
        out.mkdir()
        calibra.calibrate(
            model, _cal(), observers=observers, output=out / "stats.safetensors", progress=False, echo=None
        )

    return run


JOBS = {
    "quantize-rtn-llama": _quantize("builtin:tiny-llama", RTNConfig(bits=4, group_size=32)),
    "quantize-rtn-act-ranges-llama": _quantize("builtin:tiny-llama", RTNConfig(bits=8, group_size=-1), act_ranges=True),
    "quantize-gptq-llama": _quantize("builtin:tiny-llama", GPTQConfig(bits=4, group_size=32)),
    "quantize-gptq-act-order-llama": _quantize("builtin:tiny-llama", GPTQConfig(bits=4, group_size=32, desc_act=True)),
    "quantize-gptq-ct-llama": _quantize(
        "builtin:tiny-llama", GPTQConfig(bits=4, group_size=128), export="compressed-tensors"
    ),
    "quantize-mr-gptq-nvfp4-llama": _quantize("builtin:tiny-llama", MRGPTQConfig(format="nvfp4")),
    "quantize-gptq-mixed-llama": _quantize(
        "builtin:tiny-llama", GPTQConfig(bits=4, group_size=32), mixed_precision=4.5
    ),
    "quantize-rtn-moe": _quantize("builtin:tiny-moe", RTNConfig(bits=4, group_size=32)),
    "quantize-gptq-moe": _quantize("builtin:tiny-moe", GPTQConfig(bits=4, group_size=32)),
    "prune-magnitude-llama": _prune("builtin:tiny-llama", PruningConfig(method="magnitude", target_sparsity=0.5)),
    "prune-wanda-24-llama": _prune("builtin:tiny-llama", PruningConfig(method="wanda", pattern="2:4")),
    "prune-sparsegpt-llama": _prune("builtin:tiny-llama", PruningConfig(method="sparsegpt", target_sparsity=0.5)),
    "prune-sparsegpt-gradual-llama": _prune(
        "builtin:tiny-llama", PruningConfig(method="sparsegpt", target_sparsity=0.6, gradual_steps=3)
    ),
    "prune-sparsegpt-24-moe": _prune("builtin:tiny-moe", PruningConfig(method="sparsegpt", pattern="2:4")),
    "calibrate-llama": _calibrate("builtin:tiny-llama", ("hessian", "norms", "ranges", "kv")),
    "calibrate-moe": _calibrate("builtin:tiny-moe", ("hessian",)),
}


def _tensor_digest(t: torch.Tensor) -> str:
    t = t.contiguous()
    raw = t.view(torch.uint8) if t.element_size() == 1 else t.view(-1).view(torch.uint8)
    h = hashlib.sha256(f"{t.dtype}|{list(t.shape)}|".encode())
    h.update(raw.numpy().tobytes())
    return h.hexdigest()[:32]


def folder_digest(folder: Path) -> dict[str, str]:
    """``{relative path[:tensor]: sha256 prefix}`` over the hashed content of an output folder."""
    from safetensors.torch import load_file

    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if not p.is_file() or p.name in SKIP or p.name.startswith("tokenizer") or p.name.startswith("special_"):
            continue
        if p.suffix == ".safetensors":
            for name, t in sorted(load_file(str(p)).items()):
                out[f"{rel}:{name}"] = _tensor_digest(t)
        elif p.suffix == ".json":
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()[:32]
    return out


def _stored() -> dict:
    return json.loads(HASHES.read_text()) if HASHES.exists() else {}


@pytest.mark.parametrize("job", sorted(JOBS))
def test_output_unchanged(job, tmp_path):
    out = tmp_path / "out"
    JOBS[job](out)
    got = folder_digest(out)
    assert got, f"{job} wrote nothing that is hashed"
    if os.environ.get("CALIBRA_WRITE_HASHES") == "1":
        doc = _stored()
        doc[job] = got
        HASHES.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
        return
    want = _stored().get(job)
    assert want is not None, f"no stored hashes for {job}; see this module's docstring"
    changed = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    assert not changed, f"{job}: {len(changed)} of {len(want)} hashed items differ, e.g. {changed[:5]}"
