"""KV-cache compression quality table: rank vs measured cache compression ratio vs perplexity change,
values only (V) and keys + values (K+V), and the auto-tuned preset -- builtin:tiny-llama, builtin text.

Protocol: one calibration pass with the ``kv`` observer (``--samples`` x ``--seq-len`` tokens of the
builtin calibration text, seed 0); PCA per layer and KV head; for every rank the model runs the held-out
builtin eval text (first ``--eval-tokens`` tokens, non-overlapping ``--eval-seq-len``-token windows,
float32) with every K/V written to and read back from the compressed cache (``calibra.kv.KVCompressedLM``)
and is compared with the uncompressed model on the same tokens (perplexity; mean top-64 KL). The
compression ratio is measured: cache bytes (``nbytes`` of the stored tensors) after one window through
``PCACache`` divided by the same for transformers' ``DynamicCache``. The auto-tuned row runs
``calibra.kv.calibrate(target_ppl_delta=...)`` end to end (tuning on calibration text, verification on the
eval text with the same protocol as the table).

    PYTHONPATH=python python benchmarks/quality_kv.py                    # the README table (~15 min, 2 cores)
    PYTHONPATH=python python benchmarks/quality_kv.py --eval-tokens 8192 --ranks 32 16 --no-autotune  # quick

``--json FILE`` keeps every number; ``--preset FILE`` keeps the auto-tuned preset.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="builtin:tiny-llama")
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=65536)
    ap.add_argument("--eval-seq-len", type=int, default=256)
    ap.add_argument("--ranks", type=int, nargs="+", default=[48, 32, 24, 16, 8, 4])
    ap.add_argument("--target-ppl-delta", type=float, default=0.05)
    ap.add_argument("--autotune-targets", default="kv", choices=["v", "kv"])
    ap.add_argument("--tune-tokens", type=int, default=8192)
    ap.add_argument("--no-autotune", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--preset", default=None, help="where to keep the auto-tuned preset (default: a temp folder)")
    args = ap.parse_args(argv)

    import torch

    import calibra
    import calibra.kv as kv
    from calibra.assets import load_model
    from calibra.data import CalibrationConfig
    from calibra.models import get_adapter

    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    adapter = get_adapter(model)
    cal = CalibrationConfig(num_samples=args.samples, sequence_length=args.seq_len, seed=0)
    stats = calibra.calibrate(model, cal, observers=("kv",), tokenizer=tok, progress=False, echo=None)
    keys = [adapter.layer_name(i) for i in range(len(adapter.layers))]
    plans = {
        t: kv.KVPlan(bases={w: kv.bases_from_stats(stats, keys, w) for w in (("k", "v") if t == "kv" else ("v",))})
        for t in ("v", "kv")
    }
    d = adapter.head_dim
    probe = kv.QualityProbe(
        model, tok, dataset="builtin", seq_len=args.eval_seq_len, max_tokens=args.eval_tokens, progress=False
    )
    window = probe.sample_window()
    rows = []
    for targets in ("v", "kv"):
        for r in [d] + [r for r in args.ranks if r < d]:
            plan = plans[targets].uniform(r)
            q = probe.measure(plan)
            mem = kv.measure_bytes(model, plan, window)
            rows.append(
                {
                    "targets": targets,
                    "rank": r,
                    "ratio": mem["ratio"],
                    "v_ratio": mem["v_ratio"],
                    "ppl": q["perplexity"]["compressed"],
                    "baseline": q["perplexity"]["baseline"],
                    "delta": q["perplexity"]["increase"],
                    "kl": q["kl_divergence"]["mean"],
                    "explained": sum(b.explained(r) for b in plan.bases["v"]) / plan.num_layers,
                    "explained_k": (
                        sum(b.explained(r) for b in plan.bases["k"]) / plan.num_layers if "k" in plan.bases else None
                    ),
                }
            )
            print(
                f"[{time.perf_counter() - t0:6.0f}s] {targets:>2} r={r:<3} ratio {mem['ratio']:.4f} "
                f"ppl {rows[-1]['ppl']:.4f} ({rows[-1]['delta']:+.4f}) kl {rows[-1]['kl']:.5f}",
                file=sys.stderr,
                flush=True,
            )
    pr = q["protocol"]
    print(
        f"\n{args.model}: head_dim {d}, {len(adapter.layers)} layers x {adapter.num_kv_heads} KV heads; calibration "
        f"{args.samples} x {args.seq_len} tokens of builtin calibration text (seed 0); eval {pr['tokens_scored']} "
        f"scored tokens of builtin eval text, seq_len {pr['seq_len']}, stride {pr['stride']}, float32; baseline "
        f"perplexity {rows[0]['baseline']:.4f}\n"
    )
    print(
        "| targets | rank / head_dim | cache bytes (measured) | perplexity | Δ perplexity | mean KL (nats/token) | "
        "variance kept (V / K) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        var = f"{row['explained'] * 100:.1f}%" + (
            f" / {row['explained_k'] * 100:.1f}%" if row["explained_k"] is not None else ""
        )
        print(
            f"| {'V only' if row['targets'] == 'v' else 'K+V'} | {row['rank']}/{d} | {row['ratio'] * 100:.1f}% | "
            f"{row['ppl']:.4f} | {row['delta']:+.4f} | {row['kl']:.5f} | {var} |"
        )
    out = {
        "rows": rows,
        "protocol": pr,
        "model": args.model,
        "calibration": {"samples": args.samples, "seq_len": args.seq_len, "seed": 0},
    }
    if not args.no_autotune:
        path = Path(args.preset) if args.preset else Path(tempfile.mkdtemp()) / "kv_preset_tiny-llama.json"
        print(
            f"\nauto-tune: calibra.kv.calibrate(target_ppl_delta={args.target_ppl_delta}, "
            f"targets={args.autotune_targets!r}) ...",
            file=sys.stderr,
            flush=True,
        )
        try:
            preset = kv.calibrate(
                model,
                cal,
                tokenizer=tok,
                targets=args.autotune_targets,
                target_ppl_delta=args.target_ppl_delta,
                eval_seq_len=args.eval_seq_len,
                eval_max_tokens=args.eval_tokens,
                tune_max_tokens=args.tune_tokens,
                output=path,
                overwrite=True,
                progress=False,
                echo=lambda *a, **k: print(*a, file=sys.stderr),
            )
        except kv.NoCompressionFits as e:
            print(f"\nauto-tune: {e}")
            out["autotune"] = {"fits": False, "message": str(e), "report": e.report}
        else:
            a, q = preset.autotune, preset.quality
            print(
                f"\nauto-tuned preset (budget: perplexity increase <= {args.target_ppl_delta}; tuned on "
                f"{a['tuning']['tokens']} tokens of calibration text, seq_len {a['tuning']['seq_len']}):\n"
            )
            print(
                "| targets | ranks per layer | cache bytes (measured) | Δ perplexity, tuning text | "
                "Δ perplexity, eval text | mean KL (eval) |"
            )
            print("|---|---|---:|---:|---:|---:|")
            rk = "; ".join(f"{w.upper()} {preset.ranks[w]}" for w in ("k", "v") if w in preset.ranks)
            print(
                f"| {'K+V' if preset.targets == 'kv' else 'V only'} | {rk} | {q['memory']['ratio'] * 100:.1f}% | "
                f"{a['tuned_value']:+.4f} | {q['perplexity']['increase']:+.4f} | {q['kl_divergence']['mean']:.5f} |"
            )
            print("\nsensitivity measured by the tuner (Δ perplexity on the tuning text with one slot compressed):\n")
            print("```\n" + kv.sensitivity_table(a) + "\n```")
            out["autotune"] = {"fits": True, "preset": str(path), "autotune": a, "quality": q, "ranks": preset.ranks}
    print(f"\ntotal {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
