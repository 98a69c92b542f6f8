#!/usr/bin/env python
"""Beyond-GPTQ quality table: RTN, AWQ + RTN, GPTQ, AWQ + GPTQ, GPTAQ and the ``best`` preset over several
calibration seeds.

    PYTHONPATH=python python benchmarks/quality_awq.py --seeds 0 1 2 3 4 --samples 32 --eval-max-tokens 32768
    PYTHONPATH=python python benchmarks/quality_awq.py --models builtin:tiny-moe --only "W3 g128" --seeds 0 1

The protocol of ``benchmarks/quality_quantize.py`` (docs/quantize.md): calibration = --calibration text
(default: builtin, the mixed-domain set; builtin:code, the Python-only set, before 2026-12-07), --samples x
--seq-len tokens, batch 8, one calibration draw per seed (``CalibrationConfig.seed``);
GPTQ true-sequential, damp 0.01; evaluation on the builtin held-out text (strided windows of the model's
context, stride half of it, float32 logits), KL(unquantized || quantized) in nats per token from the top-k
log-probs. The reference is collected once per model. Every row is mean and sample standard deviation
over the seeds (RTN is data-free: one value). ``quant_seconds`` is calibra.quantize's own total (calibration
+ AWQ search + solve); "× GPTQ" is each run's time over plain GPTQ's with the same seed in the same process
(on a shared machine only these ratios mean anything). Prints a Markdown table; ``--json`` writes every run.
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
from calibra.assets import builtin_texts, load_model
from calibra.data import CalibrationConfig
from calibra.eval import collect_reference, compare, resolve_protocol
from calibra.eval.windows import token_stream
from calibra.quant import GPTQConfig, RTNConfig
from calibra.quant.presets import apply_preset

GRIDS = {"W4 g128": (4, 128), "W3 g128": (3, 128)}


def rows(only):
    out = []
    for label, (bits, g) in GRIDS.items():
        if only and label not in only:
            continue
        out += [
            (label, "RTN", RTNConfig(bits=bits, group_size=g)),
            (label, "AWQ + RTN", RTNConfig(bits=bits, group_size=g, awq=True)),
            (label, "GPTQ", GPTQConfig(bits=bits, group_size=g)),
            (label, "AWQ + GPTQ", GPTQConfig(bits=bits, group_size=g, awq=True)),
            (label, "GPTAQ", GPTQConfig(bits=bits, group_size=g, gptaq=True)),
            (label, "best", apply_preset("best", GPTQConfig(bits=bits, group_size=g))),
            # the knobs `best` was screened over (docs/quantize.md, "The best preset")
            (label, "GPTQ act-order", GPTQConfig(bits=bits, group_size=g, desc_act=True)),
            (label, "GPTAQ act-order", GPTQConfig(bits=bits, group_size=g, gptaq=True, desc_act=True)),
            (
                label,
                "GPTAQ act-order static",
                GPTQConfig(bits=bits, group_size=g, gptaq=True, desc_act=True, static_groups=True),
            ),
            (
                label,
                "GPTAQ act-order mse",
                GPTQConfig(bits=bits, group_size=g, gptaq=True, desc_act=True, mse_clip=True),
            ),
            (
                label,
                "GPTAQ act-order output-mse",
                GPTQConfig(bits=bits, group_size=g, gptaq=True, desc_act=True, mse_clip=True, clip_metric="output"),
            ),
        ]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="*", default=["builtin:tiny-llama", "builtin:tiny-moe"])
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2, 3, 4])
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=None, help="calibration tokens per sample (default: context)")
    ap.add_argument("--eval-max-tokens", type=int, default=32768)
    ap.add_argument(
        "--calibration",
        default="builtin",
        help="calibration text: builtin (the mixed-domain default), builtin:code (the Python-only set that "
        "tables dated before 2026-12-07 used), a .txt/.json/.jsonl file or folder, or a hub set name",
    )
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--only", default=None, help="comma-separated grid filter, e.g. 'W4 g128'")
    ap.add_argument("--methods", default=None, help="comma-separated method filter, e.g. 'GPTQ,AWQ + GPTQ'")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    only = args.only.split(",") if args.only else None

    runs = []
    for spec in args.models:
        model, tok = load_model(spec)
        ids = torch.tensor(token_stream(tok, builtin_texts("eval")), dtype=torch.long)
        if args.eval_max_tokens:
            ids = ids[: args.eval_max_tokens]
        seq_len, stride = resolve_protocol(model, None, None)
        ref = collect_reference(model, ids, seq_len=seq_len, stride=stride, top_k=args.top_k, progress=False)
        base = math.exp(ref.nll())
        print(f"{spec}: {ref.tokens} tokens scored, FP ppl {base:.4f}", file=sys.stderr)
        runs.append({"model": spec, "grid": "-", "method": "FP", "seed": None, "ppl": base, "kl": 0.0})
        # seed-major: an interrupted table still holds every method for the seeds it reached
        todo = [
            (grid, method, cfg, seed)
            for seed in args.seeds
            for grid, method, cfg in rows(only)
            if not (args.methods and method not in args.methods.split(","))
            and not (method == "RTN" and seed != args.seeds[0])
        ]
        for grid, method, cfg, seed in todo:
            cal = CalibrationConfig(
                num_samples=args.samples,
                sequence_length=args.seq_len,
                seed=seed,
                batch_size=8,
                dataset=args.calibration,
            )
            t0 = time.perf_counter()
            qm, rep = calibra.quantize(spec, cfg, cal, evaluate=False, progress=False, echo=None)
            r = compare(qm.model, ref, ids, progress=False)
            run = {
                "model": spec,
                "grid": grid,
                "method": method,
                "seed": seed,
                "ppl": r.ppl_compressed,
                "dppl": r.ppl_compressed - base,
                "kl": r.kl_ref_cmp["mean"],
                "quant_seconds": rep["timings"]["total"],
                "seconds": time.perf_counter() - t0,
            }
            if "awq" in rep:
                run["awq"] = rep["awq"]["groups"]
            runs.append(run)
            print(
                f"  {grid} {method:11s} seed {seed}: dppl {run['dppl']:+.4f} KL {run['kl']:.5f} "
                f"({run['quant_seconds']:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
            if args.json:  # after every run: a long table survives an interruption
                with open(args.json, "w", encoding="utf-8") as f:
                    json.dump(runs, f, indent=1)
    print(table(runs))
    return 0


def table(runs) -> str:
    """Mean ± sample std over seeds per (model, grid, method)."""
    keys = list(dict.fromkeys((r["model"], r["grid"], r["method"]) for r in runs if r["grid"] != "-"))
    gptq = {(r["model"], r["grid"], r["seed"]): r["quant_seconds"] for r in runs if r["method"] == "GPTQ"}
    lines = ["| model | grid | method | seeds | Δppl | KL | × GPTQ time |", "|---|---|---|---:|---:|---:|---:|"]
    for m, g, meth in keys:
        rs = [r for r in runs if (r["model"], r["grid"], r["method"]) == (m, g, meth)]
        ratios = [r["quant_seconds"] / gptq[m, g, r["seed"]] for r in rs if (m, g, r["seed"]) in gptq]
        lines.append(
            f"| {m.removeprefix('builtin:')} | {g} | {meth} | {len(rs)} "
            f"| {mean_spread([r['dppl'] for r in rs], '{:+.3f}')} | {mean_spread([r['kl'] for r in rs], '{:.5f}')} "
            f"| {mean_spread(ratios, '{:.2f}') if ratios else '-'} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
