"""The calibra command line. Thin: it parses, calls the API, prints."""
from __future__ import annotations

import argparse
import json
import os
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    import calibra

    info = calibra.build_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"calibra {info['version']} (torch {info['torch']})")
    for name, entry in info["backends"].items():
        if entry["loaded"]:
            fams = ", ".join(entry.get("families", []))
            extra = f", {entry['threads']} threads" if "threads" in entry else ""
            print(f"  {name:5s} loaded{extra}: {fams}")
        else:
            print(f"  {name:5s} not loaded: {entry['reason']}")
    return 0


def _cmd_selftest(args: argparse.Namespace) -> int:
    from calibra.selftest import run_selftest

    return 0 if run_selftest(device=args.device, verbose=True) else 1


def _cmd_calibrate(args: argparse.Namespace) -> int:
    import os
    import time

    from calibra.api import calibrate
    from calibra.data import CalibrationConfig

    observers = [o.strip() for o in args.observers.split(",") if o.strip()]
    config = CalibrationConfig(num_samples=args.samples, sequence_length=args.seq_len, batch_size=args.batch_size,
                               dataset=args.calibration, seed=args.seed)
    t0 = time.perf_counter()
    stats = calibrate(args.input, config, observers=observers, device=args.device, output=args.output,
                      dtype=args.dtype, hessian_dtype=args.hessian_dtype, moe_quota=args.moe_quota,
                      moe_tau=args.moe_tau, progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    size = os.path.getsize(args.output)
    n_mod = len(stats.modules(observers[0])) if observers[0] != "kv" else stats.metadata["model"]["num_layers"]
    print(f"calibrated {args.input}: {stats.token_count} tokens, {n_mod} modules ({', '.join(observers)}), "
          f"{seconds:.1f} s; wrote {args.output} ({size / 2**20:.2f} MiB)")
    return 0


def _print_eval(result, args: argparse.Namespace) -> None:
    ds = result.dataset
    what = "perplexity" if args.metric == "perplexity" else "KL divergence"
    print(f"calibra eval: {what} of {args.model}" + (f" against {args.reference}" if args.reference else ""))
    if ds.get("version"):
        print(f"  dataset     {ds['name']} (version {ds['version']}, {ds['documents']} documents)")
    print(f"  protocol    strided windows: seq_len {result.seq_len}, stride {result.stride}, "
          f"{result.windows} windows, {result.tokens} of {result.stream_tokens} tokens scored")
    if args.metric == "perplexity":
        print(f"  perplexity  {result.ppl:.4f}  (nll {result.nll:.6f} nats/token)")
        if result.reference is not None:
            ref = result.reference
            print(f"  reference   {ref.ppl:.4f}  ({(result.ppl / ref.ppl - 1) * 100:+.2f}%)")
    else:
        how = ("exact, full vocabulary" if result.mode == "exact"
               else f"top-{result.top_k} + rest bucket: a lower bound of the exact KL")
        print(f"  KL in nats per token ({how})")
        for label, st in (("KL(ref||model)", result.kl_ref_cmp), ("KL(model||ref)", result.kl_cmp_ref)):
            print(f"  {label}  mean {st['mean']:.6f}  median {st['median']:.6f}  max {st['max']:.6f}")
        print(f"  perplexity  reference {result.ppl_reference:.4f}  model {result.ppl_compressed:.4f}  "
              f"({(result.ppl_compressed / result.ppl_reference - 1) * 100:+.2f}%)")
    if result.attribution is not None:
        a = result.attribution
        print(f"per-layer attribution (reference with one compressed layer; {a.tokens} tokens, "
              f"ranked by {'KL(ref||hybrid)' if a.rank_by == 'kl' else 'perplexity increase'}):")
        print(a.table())


def _cmd_eval(args: argparse.Namespace) -> int:
    import calibra

    result = calibra.evaluate(args.model, metric=args.metric, dataset=args.dataset, reference=args.reference,
                         seq_len=args.seq_len, stride=args.stride, max_tokens=args.max_tokens, device=args.device,
                         top_k=args.top_k, exact=args.exact, attribution=args.attribution, rank_by=args.rank_by,
                         dtype=args.dtype, batch_size=args.batch_size)
    _print_eval(result, args)
    if args.json:
        out = {"model": args.model, "reference": args.reference, **result.to_dict()}
        tmp = args.json + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
        os.replace(tmp, args.json)  # never a half-written report at the final path
    return 0


def _add_eval(sub) -> None:
    ev = sub.add_parser("eval", help="perplexity, or KL divergence against a reference, with per-layer attribution",
                        description="Evaluate a model with the strided sliding-window protocol. seq_len defaults "
                                    "to the model's max_position_embeddings capped at 2048, stride to seq_len/2.")
    ev.add_argument("--model", required=True, help="model folder or builtin:NAME")
    ev.add_argument("--metric", default="perplexity", choices=["perplexity", "kl-divergence"])
    ev.add_argument("--dataset", default="builtin", help="builtin (held-out eval text), a .jsonl/.txt file or a folder")
    ev.add_argument("--reference", default=None, help="reference model folder or builtin:NAME (KL, attribution)")
    ev.add_argument("--seq-len", type=int, default=None, help="window length (default: context, at most 2048)")
    ev.add_argument("--stride", type=int, default=None, help="window step (default: seq_len/2)")
    ev.add_argument("--max-tokens", type=int, default=None, help="evaluate only the first N tokens of the stream")
    ev.add_argument("--top-k", type=int, default=64, help="reference tokens kept per position for the KL (default 64)")
    ev.add_argument("--exact", action="store_true", help="full-vocabulary KL instead of top-k")
    ev.add_argument("--attribution", action="store_true", help="rank the decoder layers by the KL each one causes")
    ev.add_argument("--rank-by", default="kl", choices=["kl", "ppl"], help="attribution ranking (default kl)")
    ev.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda if available, else cpu)")
    ev.add_argument("--dtype", default="float32", help="weights dtype: float32 (default), bfloat16, float16, auto")
    ev.add_argument("--batch-size", type=int, default=None, help="windows per forward pass (default: auto)")
    ev.add_argument("--json", default=None, help="also write the full result to this JSON file")
    ev.set_defaults(fn=_cmd_eval)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="calibra", description="Calibration-driven compression for LLMs.")
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="which native backends loaded, and why not for the others")
    info.add_argument("--json", action="store_true", help="print the full build_info() as JSON")
    info.set_defaults(fn=_cmd_info)
    st = sub.add_parser("selftest", help="run every op natively and compare it with its reference")
    st.add_argument("--device", default="cpu", help="device to test (default: cpu)")
    st.set_defaults(fn=_cmd_selftest)
    D = argparse.ArgumentDefaultsHelpFormatter
    cal = sub.add_parser("calibrate", formatter_class=D,
                         help="run calibration text through a model and save reusable statistics",
                         description="Run calibration text through MODEL one decoder layer at a time and save "
                                     "the statistics (Hessians, norms, ranges, K/V covariances, MoE routing) "
                                     "as one safetensors file that quantize/prune can reuse.")
    cal.add_argument("--input", required=True, help="builtin:NAME or a local Hugging Face model folder")
    cal.add_argument("--output", required=True, help="statistics file to write (.safetensors, atomic)")
    cal.add_argument("--calibration", default="builtin", help="calibration text: builtin, a .txt/.json/.jsonl "
                     "file or folder, or a hub set name")
    cal.add_argument("--samples", type=int, default=128, help="number of calibration samples")
    cal.add_argument("--seq-len", type=int, default=512, help="tokens per sample")
    cal.add_argument("--batch-size", type=int, default=1, help="samples per forward pass")
    cal.add_argument("--seed", type=int, default=0, help="seed that selects and orders the samples")
    cal.add_argument("--observers", default="hessian", help="comma-separated: hessian,norms,ranges,kv")
    cal.add_argument("--device", default=None, help="compute device for one layer at a time (cpu, cuda, "
                     "cuda:1); default: cuda if available, else cpu")
    cal.add_argument("--dtype", default="float32", help="dtype the model is loaded and run in "
                     "(float32, bfloat16, float16, auto)")
    cal.add_argument("--hessian-dtype", default="float32", choices=["float32", "float64"],
                     help="dtype of the Hessian sums (float64 merges bit-for-bit more often)")
    cal.add_argument("--moe-quota", type=int, default=None, help="tokens every expert should see: adds "
                     "samples by router-guided selection from a 4x candidate pool (MoE models)")
    cal.add_argument("--moe-tau", type=float, default=256.0, help="expert Hessian shrinkage: weight "
                     "tau/(n+tau) on the layer's pooled Hessian for an expert with n tokens")
    cal.add_argument("--no-progress", action="store_true", help="no progress bar")
    cal.set_defaults(fn=_cmd_calibrate)
    _add_eval(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
