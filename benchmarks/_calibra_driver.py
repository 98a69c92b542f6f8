#!/usr/bin/env python
"""calibra side of ``benchmarks/vs_llmcompressor.py``: GPTQ W4 g128 with ``calibra.quantize`` on the CPU.

Started as a subprocess by the benchmark (so its end-to-end time, like llmcompressor's, includes the
interpreter start and the imports), in the main environment with ``PYTHONPATH=python``:

    python _calibra_driver.py --model DIR --calib calib.safetensors --output OUT --json timings.json

``--calib`` holds ``input_ids`` / ``attention_mask`` (the same token ids llmcompressor gets); they go to
``calibra.quantize`` as ``(input_ids, attention_mask)``, which it uses as is. The model is loaded in
float32 (``calibra.assets.load_model``); GPTQ solves and accumulates Hessians in float32. Output: the
compressed-tensors export (``calibra.export``), the format llmcompressor writes.

``--desc-act`` / ``--static-groups`` / ``--no-true-sequential`` choose the variant (see the benchmark's docstring). The
JSON holds the timings ``import``, ``load``, ``quantize`` (the ``calibra.quantize`` call: calibration
forward passes + GPTQ solves), ``export``, and the report's own split (calibration vs solve).
"""

from __future__ import annotations

import time

T_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="a local Hugging Face model folder or builtin:NAME")
    ap.add_argument("--calib", required=True, help="safetensors file with input_ids and attention_mask")
    ap.add_argument("--output", required=True, help="folder for the compressed-tensors export")
    ap.add_argument("--json", required=True, help="where to write the timings")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--static-groups", action="store_true", help="group scales fitted on the original weights")
    ap.add_argument("--desc-act", action="store_true", help="act-order: columns by descending Hessian diagonal")
    ap.add_argument(
        "--no-true-sequential",
        action="store_true",
        help="one Hessian pass per decoder layer (as llmcompressor), not one per sub-layer",
    )
    args = ap.parse_args(argv)

    import torch
    from safetensors.torch import load_file

    import calibra
    from calibra.assets import load_model
    from calibra.quant import GPTQConfig

    t = {"import": time.perf_counter() - T_START}
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype="float32")
    t["load"] = time.perf_counter() - t0

    calib = load_file(args.calib)
    ids, mask = calib["input_ids"].to(torch.int64), calib["attention_mask"].bool()
    cfg = GPTQConfig(
        bits=4,
        group_size=args.group_size,
        sym=True,
        desc_act=args.desc_act,
        static_groups=args.static_groups,
        damp_percent=args.damp,
        block_size=args.block_size,
        true_sequential=not args.no_true_sequential,
    )
    t0 = time.perf_counter()
    qm, report = calibra.quantize(
        model, cfg, (ids, mask), tokenizer=tokenizer, evaluate=False, device="cpu", progress=False, echo=None
    )
    t["quantize"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    calibra.export(qm, args.output, "compressed-tensors")
    t["export"] = time.perf_counter() - t0
    t["total_in_process"] = time.perf_counter() - T_START

    out = {
        "timings": t,
        "report_timings": {k: report["timings"][k] for k in ("calibration", "solve")},
        "samples": int(ids.shape[0]),
        "seq_len": int(ids.shape[1]),
        "tokens": int(mask.sum()),
        "threads": torch.get_num_threads(),
        "model_dtype": str(next(model.parameters()).dtype),
        "config": report["settings"]["config"],
        "versions": report["versions"],
        "executable": sys.executable,
        "pid": os.getpid(),
    }
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
