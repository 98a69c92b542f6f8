#!/usr/bin/env python
"""The quantization quality table: perplexity and KL of every method against the unquantized model.

    PYTHONPATH=python python benchmarks/quality_quantize.py                       # both builtin models
    PYTHONPATH=python python benchmarks/quality_quantize.py --models builtin:tiny-moe --samples 64

Rows: FP16 (the unquantized model, evaluated in float32: the builtin models are stored in bf16),
RTN / GPTQ / GPTQ act-order for W4 g128, W3 g128 and W8 per-channel (int, symmetric); RTN vs MR-GPTQ
for MXFP4 and NVFP4. Every quantized model comes from ``calibra.quantize`` (GPTQ: true-sequential,
damp 0.01, calibration = --calibration text (default: the builtin mixed-domain set; builtin:code before
2026-12-07), --samples x --seq-len tokens, seed 0).

Protocol (stated under the table): the builtin held-out eval text (disjoint from training and
calibration), tokenized as one stream, strided windows of seq_len (default: the model's context)
with stride seq_len/2, every token scored once; float32 logits. KL = mean over scored tokens of
KL(P_unquantized || P_quantized) in nats, top-k buckets with k = 64 (a lower bound of the exact KL;
calibra.eval.kl). The reference is collected once per model and every row is compared to it.
Prints a Markdown table and writes JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch

import calibra
from calibra.assets import builtin_texts, load_model
from calibra.data import CalibrationConfig
from calibra.eval import collect_reference, compare, resolve_protocol
from calibra.eval.windows import token_stream
from calibra.quant import GPTQConfig, MRGPTQConfig, RTNConfig


def rows():
    out = []
    for label, bits, g in (("W4 g128", 4, 128), ("W3 g128", 3, 128), ("W8 per-channel", 8, -1)):
        out += [
            (label, "RTN", RTNConfig(bits=bits, group_size=g)),
            (label, "GPTQ", GPTQConfig(bits=bits, group_size=g)),
            (label, "GPTQ act-order", GPTQConfig(bits=bits, group_size=g, desc_act=True)),
        ]
    for fmt in ("mxfp4", "nvfp4"):
        out += [
            (fmt.upper(), "RTN", RTNConfig(bits=4, group_size={"mxfp4": 32, "nvfp4": 16}[fmt], format=fmt)),
            (fmt.upper(), "MR-GPTQ", MRGPTQConfig(format=fmt)),
        ]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=["builtin:tiny-llama", "builtin:tiny-moe"])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument(
        "--seq-len", type=int, default=None, help="calibration tokens per sample (default: the model's context)"
    )
    ap.add_argument("--batch-size", type=int, default=8, help="calibration samples per forward pass")
    ap.add_argument(
        "--calibration",
        default="builtin",
        help="calibration text: builtin (the mixed-domain default), builtin:code (the Python-only set that "
        "tables dated before 2026-12-07 used), a .txt/.json/.jsonl file or folder, or a hub set name",
    )
    ap.add_argument("--eval-seq-len", type=int, default=None, help="eval window (default: the model's context)")
    ap.add_argument("--eval-max-tokens", type=int, default=None, help="cut the eval stream (default: all of it)")
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--only", default=None, help="comma-separated row filter, e.g. 'W4 g128'")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    results = []
    for spec in args.models:
        model, tok = load_model(spec)
        ids = torch.tensor(token_stream(tok, builtin_texts("eval")), dtype=torch.long)
        if args.eval_max_tokens:
            ids = ids[: args.eval_max_tokens]
        seq_len, stride = resolve_protocol(model, args.eval_seq_len, None)
        t0 = time.perf_counter()
        ref = collect_reference(model, ids, seq_len=seq_len, stride=stride, top_k=args.top_k, progress=False)
        base = math.exp(ref.nll())
        print(
            f"{spec}: {ids.numel()} eval tokens, seq_len {seq_len}, stride {stride}, {ref.tokens} scored; "
            f"FP ppl {base:.4f} ({time.perf_counter() - t0:.0f} s)",
            file=sys.stderr,
        )
        results.append(
            {"model": spec, "group": "-", "method": "FP16 (unquantized)", "ppl": base, "kl": 0.0, "seconds": 0.0}
        )
        for group, method, cfg in rows():
            if args.only and group not in args.only.split(","):
                continue
            t0 = time.perf_counter()
            cal = CalibrationConfig(
                num_samples=args.samples,
                sequence_length=args.seq_len,
                seed=0,
                batch_size=min(args.batch_size, args.samples),
                dataset=args.calibration,
            )
            qm, rep = calibra.quantize(spec, cfg, cal, evaluate=False, progress=False, echo=None)
            r = compare(qm.model, ref, ids, progress=False)
            row = {
                "model": spec,
                "group": group,
                "method": method,
                "ppl": r.ppl_compressed,
                "kl": r.kl_ref_cmp["mean"],
                "seconds": time.perf_counter() - t0,
                "quant_seconds": rep["timings"]["total"],
            }
            results.append(row)
            print(
                f"  {group:15s} {method:15s} ppl {row['ppl']:.4f} (+{row['ppl'] - base:.4f})  KL {row['kl']:.5f}  "
                f"{row['seconds']:.0f} s",
                file=sys.stderr,
            )
        results[-1]["protocol"] = {
            "eval_tokens": int(ids.numel()),
            "scored": ref.tokens,
            "seq_len": seq_len,
            "stride": stride,
            "top_k": ref.top_k,
        }
    print(table(results, args))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)
    return 0


def table(results, args) -> str:
    models = list(dict.fromkeys(r["model"] for r in results))
    keys = list(dict.fromkeys((r["group"], r["method"]) for r in results))
    by = {(r["model"], r["group"], r["method"]): r for r in results}
    head = "| format | method | " + " | ".join(f"{m} ppl | {m} KL" for m in models) + " |"
    lines = [head, "|" + "---|" * (2 + 2 * len(models))]
    for g, meth in keys:
        cells = []
        for m in models:
            r = by.get((m, g, meth))
            base = by[(m, "-", "FP16 (unquantized)")]["ppl"]
            if r is None:
                cells += ["", ""]
            elif g == "-":
                cells += [f"{r['ppl']:.3f}", "0"]
            else:
                cells += [f"{r['ppl']:.3f} (+{r['ppl'] - base:.3f})", f"{r['kl']:.4f}"]
        lines.append(f"| {g} | {meth} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
