#!/usr/bin/env python
"""llmcompressor side of ``benchmarks/vs_llmcompressor.py``: GPTQ W4A16 with ``oneshot`` on the CPU.

Runs inside llmcompressor's own virtual environment (``tools/client_lane.sh setup`` makes
``build/client-venvs/llmc``), started as a subprocess by the benchmark. It imports nothing from calibra:

    python _llmc_driver.py --model DIR --calib calib.safetensors --output OUT --json timings.json

``--calib`` holds ``input_ids`` (int64 [S, L]) and ``attention_mask`` ([S, L]) written by the benchmark,
the exact token ids calibra quantizes with. They go to ``oneshot`` as a pre-tokenized ``datasets.Dataset``
(llmcompressor 0.14 uses a dataset that has an ``input_ids`` column as is, without tokenizing again).

GPTQ settings, all set explicitly: int4 symmetric, group 128 (the W4A16 preset), ``block_size=128``,
``dampening_frac=0.01``, ``actorder`` from ``--actorder`` (``none``, or ``static``: llmcompressor's
default), ``ignore=["lm_head"]``; the model is loaded in float32 (llmcompressor's GPTQ solves
in float32 whatever the model dtype); the default sequential pipeline (one decoder layer at a time,
quantized outputs propagated to the next layer). Output: ``save_pretrained(OUT, save_compressed=True)``
(compressed-tensors ``pack-quantized``) plus the tokenizer.

The JSON holds the timings: ``import`` (python start to llmcompressor imported), ``load`` (model +
tokenizer), ``dataset``, ``oneshot`` (the quantization itself), ``save``, and versions.
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
    ap.add_argument("--model", required=True, help="a local Hugging Face model folder")
    ap.add_argument("--calib", required=True, help="safetensors file with input_ids and attention_mask")
    ap.add_argument("--output", required=True, help="folder for the compressed-tensors checkpoint")
    ap.add_argument("--json", required=True, help="where to write the timings")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument(
        "--actorder",
        choices=("none", "static"),
        default="none",
        help="GPTQModifier actorder: none, or static (llmcompressor's default: act-order with group "
        "scales fitted before the sweep)",
    )
    args = ap.parse_args(argv)

    import compressed_tensors
    import llmcompressor
    import torch
    import transformers
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t = {"import": time.perf_counter() - T_START}
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    t["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    calib = load_file(args.calib)
    ids, mask = calib["input_ids"].to(torch.int64), calib["attention_mask"].to(torch.int64)
    n, seq_len = ids.shape
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": mask.tolist()})
    t["dataset"] = time.perf_counter() - t0

    actorder = None if args.actorder == "none" else args.actorder
    common = dict(ignore=["lm_head"], block_size=args.block_size, dampening_frac=args.damp, actorder=actorder)
    if args.group_size == 128:  # the preset: int4, symmetric, group 128, memoryless min-max scales
        recipe = GPTQModifier(targets="Linear", scheme="W4A16", **common)
    else:  # the same scheme with another group size
        weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=args.group_size)
        recipe = GPTQModifier(
            config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}, **common
        )
    t0 = time.perf_counter()
    oneshot(
        model=model,
        dataset=ds,
        recipe=recipe,
        num_calibration_samples=n,
        max_seq_length=seq_len,
        shuffle_calibration_samples=False,
    )
    t["oneshot"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    model.save_pretrained(args.output, save_compressed=True)
    tokenizer.save_pretrained(args.output)
    t["save"] = time.perf_counter() - t0
    t["total_in_process"] = time.perf_counter() - T_START

    out = {
        "timings": t,
        "samples": int(n),
        "seq_len": int(seq_len),
        "tokens": int(mask.sum()),
        "threads": torch.get_num_threads(),
        "model_dtype": str(next(model.parameters()).dtype),
        "recipe": {
            "scheme": f"W4A16 (int4 sym, group {args.group_size})",
            "block_size": args.block_size,
            "dampening_frac": args.damp,
            "actorder": actorder,
            "ignore": ["lm_head"],
        },
        "versions": {
            "llmcompressor": llmcompressor.__version__,
            "transformers": transformers.__version__,
            "compressed_tensors": compressed_tensors.__version__,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
        },
        "executable": sys.executable,
        "pid": os.getpid(),
    }
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
