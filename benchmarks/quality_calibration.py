#!/usr/bin/env python
"""Which calibration text: the same quantization calibrated on different text sets, scored on code and on prose.

    PYTHONPATH=python python benchmarks/quality_calibration.py --seeds 0 1 2 --json calibration.json
    PYTHONPATH=python python benchmarks/quality_calibration.py --calibration builtin:code my_texts.jsonl \\
        --eval builtin:eval builtin:eval-prose --models builtin:tiny-llama

The protocol of ``benchmarks/quality_quantize.py`` (docs/quantize.md), with the calibration text and the
evaluation text as the variables: every model is quantized once per (method, calibration set, seed) with
``calibra.quantize`` (--samples x the model's context, batch 8, seed = ``CalibrationConfig.seed``; GPTQ
true-sequential, damp 0.01) and scored on every evaluation set (its first --eval-max-tokens tokens, 32768
by default, as in ``quality_awq.py``) against the unquantized model (strided windows of the model's
context, stride half of it, float32 logits; KL(unquantized || quantized) in nats per token from the
top-k log-probs). RTN is data-free: one run per model. Rows are mean ± sample standard deviation
over the seeds. docs/calibration.md holds the table this prints.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch
from _common import mean_spread

import calibra
from calibra.assets import load_model, resolve_texts
from calibra.data import CalibrationConfig
from calibra.eval import collect_reference, compare, resolve_protocol
from calibra.eval.windows import token_stream
from calibra.quant import GPTQConfig, RTNConfig

METHODS = {
    "RTN W4 g128": lambda: RTNConfig(bits=4, group_size=128),
    "GPTQ W4 g128": lambda: GPTQConfig(bits=4, group_size=128),
    "GPTQ W3 g128": lambda: GPTQConfig(bits=3, group_size=128),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=["builtin:tiny-llama", "builtin:tiny-moe"])
    ap.add_argument(
        "--calibration",
        nargs="*",
        default=["builtin:code", "builtin:calibration"],
        help="calibration sets to compare: builtin:NAME, a .txt/.json/.jsonl file or folder, a hub name",
    )
    ap.add_argument("--eval", nargs="*", default=["builtin:eval", "builtin:eval-prose"], help="evaluation texts")
    ap.add_argument("--methods", default="RTN W4 g128,GPTQ W4 g128", help=f"comma-separated, of: {', '.join(METHODS)}")
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=None, help="calibration tokens per sample (default: context)")
    ap.add_argument("--eval-max-tokens", type=int, default=32768, help="cut each evaluation stream (0: all of it)")
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",")]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        ap.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")

    runs = []
    for spec in args.models:
        model, tok = load_model(spec)
        seq_len, stride = resolve_protocol(model, None, None)
        refs = {}
        for ev in args.eval:
            ids = torch.tensor(token_stream(tok, resolve_texts(ev, "eval")), dtype=torch.long)
            if args.eval_max_tokens:
                ids = ids[: args.eval_max_tokens]
            ref = collect_reference(model, ids, seq_len=seq_len, stride=stride, top_k=args.top_k, progress=False)
            refs[ev] = (ids, ref)
            runs.append({"model": spec, "eval": ev, "method": "FP", "ppl": math.exp(ref.nll()), "tokens": ref.tokens})
            print(f"{spec} on {ev}: {ref.tokens} tokens scored, FP ppl {math.exp(ref.nll()):.4f}", file=sys.stderr)
        del model
        todo = [
            (method, cal, seed)
            for method in methods
            for cal in (args.calibration if not method.startswith("RTN") else ["(data-free)"])
            for seed in (args.seeds if not method.startswith("RTN") else args.seeds[:1])
        ]
        for method, cal, seed in todo:
            t0 = time.perf_counter()
            calib = None
            if cal != "(data-free)":
                calib = CalibrationConfig(
                    num_samples=args.samples, sequence_length=args.seq_len, seed=seed, batch_size=8, dataset=cal
                )
            qm, _ = calibra.quantize(spec, METHODS[method](), calib, evaluate=False, progress=False, echo=None)
            for ev, (ids, ref) in refs.items():
                r = compare(qm.model, ref, ids, progress=False)
                base = math.exp(ref.nll())
                run = {
                    "model": spec,
                    "eval": ev,
                    "method": method,
                    "calibration": cal,
                    "seed": seed,
                    "ppl": r.ppl_compressed,
                    "dppl": r.ppl_compressed - base,
                    "kl": r.kl_ref_cmp["mean"],
                }
                runs.append(run)
                print(
                    f"  {method} cal {cal} seed {seed} on {ev}: dppl {run['dppl']:+.4f} KL {run['kl']:.5f} "
                    f"({time.perf_counter() - t0:.0f} s)",
                    file=sys.stderr,
                    flush=True,
                )
            if args.json:  # after every run: a long table survives an interruption
                with open(args.json, "w", encoding="utf-8") as f:
                    json.dump(runs, f, indent=1)
    print(table(runs))
    return 0


def table(runs) -> str:
    """One row per (model, method, calibration set); Δppl and KL per evaluation set, mean ± std over seeds."""
    evals = list(dict.fromkeys(r["eval"] for r in runs))
    fp = {(r["model"], r["eval"]): r["ppl"] for r in runs if r["method"] == "FP"}
    keys = list(dict.fromkeys((r["model"], r["method"], r["calibration"]) for r in runs if r["method"] != "FP"))
    head = "| model | method | calibration | seeds | " + " | ".join(f"{e} Δppl | {e} KL" for e in evals) + " |"
    lines = [head, "|---|---|---|---:|" + "---:|" * (2 * len(evals))]
    for m, meth, cal in keys:
        cells, n = [], 0
        for e in evals:
            rs = [r for r in runs if (r["model"], r["method"], r.get("calibration"), r["eval"]) == (m, meth, cal, e)]
            n = max(n, len(rs))
            if rs:
                cells += [mean_spread([r["dppl"] for r in rs], "{:+.3f}"), mean_spread([r["kl"] for r in rs], "{:.5f}")]
            else:
                cells += ["", ""]
        lines.append(f"| {m.removeprefix('builtin:')} | {meth} | {cal} | {n} | " + " | ".join(cells) + " |")
    fps = "; ".join(f"{m.removeprefix('builtin:')} on {e}: {p:.3f}" for (m, e), p in fp.items())
    return "\n".join(lines) + f"\n\nUnquantized perplexity: {fps}."


if __name__ == "__main__":
    sys.exit(main())
