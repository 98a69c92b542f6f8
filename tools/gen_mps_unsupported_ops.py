"""Writes python/calibra/mps/unsupported_ops.py: the aten ops PyTorch's MPS backend has no kernel for.

Source: the installed torch's own op table, ``torchgen/packaged/ATen/native/native_functions.yaml`` (shipped
in every torch wheel). An op is listed when its dispatch table names backend kernels (CPU and/or CUDA) but no
``MPS`` kernel and no composite kernel (``CompositeExplicitAutograd`` ops run on every backend;
``CompositeImplicitAutograd`` ops decompose before a dispatch mode sees them). A functional op with a
``structured_delegate`` inherits its out variant's table, and a functional op whose only kernel is
``CompositeExplicitAutograd`` is listed with its out variant (that composite allocates and calls the out
kernel below the dispatch mode, e.g. ``frexp.Tensor`` -> ``frexp.Tensor_out``). Ops named ``*_for_cpu*`` are
left out: torch picks them only for CPU tensors (scaled_dot_product_attention's CPU flash kernel), and the same
call on MPS picks its MPS variant. Float64 is refused separately (MPS has no float64
at all). Run with the torch CI pins (.ci/run) and commit the result; tests/mps checks the file is current.

    python tools/gen_mps_unsupported_ops.py [--check]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torchgen
import yaml

OUT = Path(__file__).resolve().parent.parent / "python" / "calibra" / "mps" / "unsupported_ops.py"


def _keys(entry) -> set[str]:
    keys: set[str] = set()
    for k in entry.get("dispatch") or {}:
        keys |= {x.strip() for x in k.split(",")}
    return keys


def unsupported_ops() -> list[str]:
    table = Path(torchgen.__file__).parent / "packaged" / "ATen" / "native" / "native_functions.yaml"
    entries = yaml.safe_load(table.read_text())
    by_name = {e["func"].split("(")[0]: e for e in entries}
    out = []
    for name, e in by_name.items():
        keys = _keys(e)
        if not keys and "structured_delegate" in e:
            keys = _keys(by_name.get(e["structured_delegate"], {}))
        if not keys or any(k.startswith("Composite") for k in keys):
            continue
        if {"CPU", "CUDA"} & keys and "MPS" not in keys and "_for_cpu" not in name:
            out.append(name)
    missing_out = {n.split(".")[0] for n in out if n.endswith("out")}
    for name, e in by_name.items():
        if _keys(e) == {"CompositeExplicitAutograd"} and name.split(".")[0] in missing_out and "out" not in name:
            out.append(name)
    return sorted({n if "." in n else f"{n}.default" for n in out})


def render() -> str:
    names = unsupported_ops()
    body = "\n".join(f'        "{n}",' for n in names)
    return (
        '"""The aten ops PyTorch\'s MPS backend has no kernel for (generated: do not edit).\n\n'
        f"Source: torch {torch.__version__.split('+')[0]}'s native_functions.yaml (torchgen/packaged/ATen/native), "
        "the dispatch\ntables torch builds its kernels from; generator: tools/gen_mps_unsupported_ops.py (read its "
        "doc for the rule).\nNames are ``op.overload`` as ``torch.ops.aten`` spells them. MPS also has no float64 "
        '(refused separately).\n"""\n\n'
        f'TORCH_VERSION = "{torch.__version__.split("+")[0]}"\n\n'
        f"UNSUPPORTED_OPS = frozenset(\n    {{\n{body}\n    }}\n)\n"
    )


if __name__ == "__main__":
    text = render()
    if "--check" in sys.argv:
        sys.exit(0 if OUT.read_text() == text else 1)
    OUT.write_text(text)
    print(f"wrote {OUT} ({text.count(chr(10))} lines)")
