"""Pruning quality table: dense vs magnitude vs Wanda vs SparseGPT at 50% unstructured, 2:4 and 4:8, plus
SparseGPT 2:4 + W4 and 50% + W4 -- perplexity and KL(dense || pruned) on the builtin held-out text.

Every configuration runs ``calibra.prune`` on a fresh copy of the model with the same tokenized
calibration samples; the dense model's reference (top-k logits) is collected once per model and every
pruned copy is compared with it (``calibra.eval.session.EvalSession``: strided windows, top-k KL).

    PYTHONPATH=python python benchmarks/quality_prune.py                       # both builtin models
    PYTHONPATH=python python benchmarks/quality_prune.py --models builtin:tiny-moe --eval-tokens 32768

Prints one markdown table (for the README) and, per pattern, whether the expected order
SparseGPT <= Wanda <= magnitude holds for perplexity and for KL. ``--json FILE`` keeps every number.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time

import torch

ROWS = (
    [("dense", None, None, None)]
    + [
        (method, pattern, sparsity, None)
        for pattern, sparsity in (("unstructured", 0.5), ("2:4", None), ("4:8", None))
        for method in ("magnitude", "wanda", "sparsegpt")
    ]
    + [("sparsegpt", "2:4", None, 4), ("sparsegpt", "unstructured", 0.5, 4)]
)


def _label(pattern, sparsity):
    return "50% unstructured" if pattern == "unstructured" else pattern


def run_model(spec: str, args) -> list[dict]:
    import calibra
    from calibra.assets import load_model
    from calibra.data import CalibrationConfig
    from calibra.eval.session import EvalSession
    from calibra.prune import JointQuant, PruningConfig

    torch.manual_seed(0)
    model, tok = load_model(spec, dtype="float32")
    # a CalibrationConfig (tokenized inside each run, identically): batches of --batch-size samples keep the
    # per-batch Python work of the MoE observers small
    calib = CalibrationConfig(
        num_samples=args.samples, sequence_length=args.seq_len, seed=args.seed, batch_size=args.batch_size
    )
    t0 = time.perf_counter()
    ev = EvalSession(model, tok, max_tokens=args.eval_tokens, seq_len=args.eval_seq_len, progress=False, label="pruned")
    print(f"{spec}: reference on {ev.ids.numel()} eval tokens in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    out = []
    for method, pattern, sparsity, bits in ROWS:
        t0 = time.perf_counter()
        if method == "dense":
            block = ev.finish(model)
            achieved = 0.0
        else:
            jq = None if bits is None else JointQuant(bits=bits, group_size=args.group_size)
            cfg = PruningConfig(method=method, pattern=pattern, target_sparsity=sparsity, quantize=jq)
            m = copy.deepcopy(model)
            _, rep = calibra.prune(
                m, cfg, calib, tokenizer=tok, evaluate=False, progress=False, echo=None, device=args.device
            )
            block = ev.finish(m)
            achieved = rep["summary"]["achieved_sparsity"]
            del m
        row = {
            "model": spec,
            "method": method,
            "pattern": None if pattern is None else _label(pattern, sparsity),
            "bits": bits,
            "achieved_sparsity": achieved,
            "ppl": block["perplexity"]["compressed"],
            "ppl_dense": block["perplexity"]["baseline"],
            "kl_mean": block["kl_divergence"]["mean"],
            "kl_median": block["kl_divergence"]["median"],
            "eval_tokens": block["protocol"]["tokens_scored"],
            "seconds": time.perf_counter() - t0,
        }
        out.append(row)
        if args.json:  # keep partial results of long runs
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump({"args": vars(args), "rows": out}, f, indent=2)
        print(
            f"  {method:9s} {str(row['pattern']):17s} W{bits or 16:<2} ppl {row['ppl']:9.3f}  KL {row['kl_mean']:.4f}"
            f"  ({row['seconds']:.0f} s)",
            file=sys.stderr,
            flush=True,
        )
    return out


def table(rows: list[dict]) -> str:
    lines = [
        "| model | method | pattern | weights | achieved sparsity | perplexity | Δ ppl | KL (nats/token) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d = (r["ppl"] / r["ppl_dense"] - 1) * 100
        lines.append(
            f"| {r['model'].replace('builtin:', '')} | {r['method']} | {r['pattern'] or '—'} | "
            f"{'W' + str(r['bits']) if r['bits'] else 'fp32'} | {r['achieved_sparsity']:.3f} | "
            f"{r['ppl']:.3f} | {d:+.1f}% | {r['kl_mean']:.4f} |"
        )
    return "\n".join(lines)


def order_checks(rows: list[dict]) -> list[str]:
    """Per model and pattern: does SparseGPT <= Wanda <= magnitude hold (perplexity, KL)?"""
    notes = []
    for model in dict.fromkeys(r["model"] for r in rows):
        for pattern in ("50% unstructured", "2:4", "4:8"):
            by = {r["method"]: r for r in rows if r["model"] == model and r["pattern"] == pattern and not r["bits"]}
            if len(by) < 3:
                continue
            for key, name in (("ppl", "perplexity"), ("kl_mean", "KL")):
                s, w, m = by["sparsegpt"][key], by["wanda"][key], by["magnitude"][key]
                ok = s <= w <= m
                notes.append(
                    f"{model} {pattern} {name}: sparsegpt {s:.4f} <= wanda {w:.4f} <= magnitude {m:.4f}: "
                    f"{'holds' if ok else 'EXCEPTION'}"
                )
    return notes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="builtin:tiny-llama,builtin:tiny-moe")
    p.add_argument("--samples", type=int, default=32, help="calibration samples")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="calibration samples per forward pass")
    p.add_argument("--eval-tokens", type=int, default=32768, help="first N tokens of the held-out stream")
    p.add_argument(
        "--eval-seq-len",
        type=int,
        default=256,
        help="evaluation window (stride = half; the builtin models were trained on 256)",
    )
    p.add_argument("--group-size", type=int, default=128, help="W4 joint quantization group size")
    p.add_argument("--device", default=None)
    p.add_argument("--json", default=None, help="write every row to this JSON file")
    args = p.parse_args(argv)
    rows = []
    for spec in [s.strip() for s in args.models.split(",") if s.strip()]:
        rows += run_model(spec, args)
    print(table(rows))
    print()
    for n in order_checks(rows):
        print(f"- {n}")
    print(
        f"\ncalibration: {args.samples} x {args.seq_len} tokens of builtin text (seed {args.seed}); eval: first "
        f"{args.eval_tokens} tokens of builtin held-out text, windows of {args.eval_seq_len}, stride "
        f"{args.eval_seq_len // 2}; KL top-64 (lower bound of the exact KL); W4 = symmetric int4, group "
        f"{args.group_size}, quantized inside SparseGPT's sweep"
    )
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
