"""The calibra command line. Thin: it parses, calls the API, prints."""

from __future__ import annotations

import argparse
import json
import os
import sys

from calibra.cli_flags import add_sample_flags, add_stream_flags

# a constant only (calibra.eval.session imports torch, never transformers)
from calibra.eval.session import REPORT_EVAL_TOKENS


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help unless the help already explains its default (an
    automatic default such as "the model's context" reads better than "(default: None)"), the option
    is required, or it has no default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default is None or action.required:
            return text
        return super()._get_help_string(action)


def _add_eval_flags(p) -> None:
    """The report-evaluation flags of the compressing verbs (quantize, prune)."""
    p.add_argument("--eval", action="store_true", help="evaluate (on by default for builtin models)")
    p.add_argument("--no-eval", action="store_true", help="skip evaluation")
    p.add_argument(
        "--eval-max-tokens",
        type=int,
        default=REPORT_EVAL_TOKENS,
        help="evaluate on the first N held-out tokens, 0 for the whole stream (default: %(default)s)",
    )
    p.add_argument("--eval-seq-len", type=int, default=None, help="evaluation window (default: context, <= 2048)")


def _add_read_flags(p) -> None:
    """Opt-ins for model folders calibra refuses by default (calibra.io.model_reader)."""
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="accept a checkpoint that has only pickle weights "
        "(.bin/.pt): unpickling can run code, so it is refused by default; with this flag the files "
        "load with torch.load(weights_only=True), which admits tensors and plain containers only",
    )
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="accept a model whose config.json has an "
        "auto_map: transformers then imports and runs the Python files shipped with the model. Read "
        "them first; without this flag such models are refused",
    )


def _add_resume_flags(p: argparse.ArgumentParser, results: str) -> None:
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue a killed or failed run of the same command from "
        "its layer checkpoints (.DIR.calibra-work beside DIR); refused if the model, settings, calibration "
        "data or versions differ. The result is byte-identical to an uninterrupted run",
    )
    p.add_argument(
        "--no-checkpoint",
        action="store_true",
        help=f"do not checkpoint finished layers (saves the disk "
        f"writes of one layer's {results} and the next layer's inputs per layer; a killed run then restarts "
        f"from the first layer)",
    )


def _add_dry_run(p) -> None:
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check every setting and the model folder, print the "
        "memory and disk plan (peak device memory, peak host memory, disk, placement) and exit without "
        "loading a weight",
    )


def _read_opts(args) -> dict:
    return {"allow_pickle": args.allow_pickle, "trust_remote_code": args.trust_remote_code}


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


def _writer_rank() -> bool:
    """False on the ranks of a torch.distributed job that do not write (they print no summary either)."""
    from calibra.jobs.distributed import current_world

    return current_world().writer


def _cmd_calibrate(args: argparse.Namespace) -> int:
    import os
    import time

    from calibra.api import calibrate
    from calibra.data import CalibrationConfig

    observers = [o.strip() for o in args.observers.split(",") if o.strip()]
    config = CalibrationConfig(
        num_samples=args.samples,
        sequence_length=args.seq_len,
        batch_size=args.batch_size,
        dataset=args.calibration,
        seed=args.seed,
    )
    t0 = time.perf_counter()
    stats = calibrate(
        args.input,
        config,
        observers=observers,
        device=args.device,
        output=args.output,
        dtype=args.dtype,
        hessian_dtype=args.hessian_dtype,
        moe_quota=args.moe_quota,
        moe_tau=args.moe_tau,
        progress=not args.no_progress,
        dry_run=args.dry_run,
        **_read_opts(args),
    )
    if args.dry_run or not _writer_rank():
        return 0
    seconds = time.perf_counter() - t0
    size = os.path.getsize(args.output)
    n_mod = len(stats.modules(observers[0])) if observers[0] != "kv" else stats.metadata["model"]["num_layers"]
    print(
        f"calibrated {args.input}: {stats.token_count} tokens, {n_mod} modules ({', '.join(observers)}), "
        f"{seconds:.1f} s; wrote {args.output} ({size / 2**20:.2f} MiB)"
    )
    return 0


def _print_eval(result, args: argparse.Namespace) -> None:
    ds = result.dataset
    what = "perplexity" if args.metric == "perplexity" else "KL divergence"
    print(f"calibra eval: {what} of {args.model}" + (f" against {args.reference}" if args.reference else ""))
    if ds.get("version"):
        print(f"  dataset     {ds['name']} (version {ds['version']}, {ds['documents']} documents)")
    print(
        f"  protocol    strided windows: seq_len {result.seq_len}, stride {result.stride}, "
        f"{result.windows} windows, {result.tokens} of {result.stream_tokens} tokens scored"
    )
    if args.metric == "perplexity":
        print(f"  perplexity  {result.ppl:.4f}  (nll {result.nll:.6f} nats/token)")
        if result.reference is not None:
            ref = result.reference
            print(f"  reference   {ref.ppl:.4f}  ({(result.ppl / ref.ppl - 1) * 100:+.2f}%)")
    else:
        how = (
            "exact, full vocabulary"
            if result.mode == "exact"
            else f"top-{result.top_k} + rest bucket: a lower bound of the exact KL"
        )
        print(f"  KL in nats per token ({how})")
        for label, st in (("KL(ref||model)", result.kl_ref_cmp), ("KL(model||ref)", result.kl_cmp_ref)):
            print(f"  {label}  mean {st['mean']:.6f}  median {st['median']:.6f}  max {st['max']:.6f}")
        print(
            f"  perplexity  reference {result.ppl_reference:.4f}  model {result.ppl_compressed:.4f}  "
            f"({(result.ppl_compressed / result.ppl_reference - 1) * 100:+.2f}%)"
        )
    if result.attribution is not None:
        a = result.attribution
        print(
            f"per-layer attribution (reference with one compressed layer; {a.tokens} tokens, "
            f"ranked by {'KL(ref||hybrid)' if a.rank_by == 'kl' else 'perplexity increase'}):"
        )
        print(a.table())


def _cmd_eval(args: argparse.Namespace) -> int:
    import calibra

    result = calibra.evaluate(
        args.model,
        metric=args.metric,
        dataset=args.dataset,
        reference=args.reference,
        seq_len=args.seq_len,
        stride=args.stride,
        max_tokens=args.max_tokens,
        device=args.device,
        top_k=args.top_k,
        exact=args.exact,
        attribution=args.attribution,
        rank_by=args.rank_by,
        dtype=args.dtype,
        batch_size=args.batch_size,
        stream=args.stream,
        **_read_opts(args),
    )
    _print_eval(result, args)
    if args.json:
        out = {"model": args.model, "reference": args.reference, **result.to_dict()}
        tmp = args.json + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)
        os.replace(tmp, args.json)  # never a half-written report at the final path
    return 0


def _add_eval(sub) -> None:
    ev = sub.add_parser(
        "eval",
        help="perplexity, or KL divergence against a reference, with per-layer attribution",
        description="Evaluate a model with the strided sliding-window protocol. seq_len defaults "
        "to the model's max_position_embeddings capped at 2048, stride to seq_len/2.",
    )
    ev.add_argument("--model", required=True, help="model folder or builtin:NAME")
    ev.add_argument("--metric", default="perplexity", choices=["perplexity", "kl-divergence"])
    ev.add_argument(
        "--dataset",
        default="builtin",
        help="builtin (= builtin:eval, held-out Python text), builtin:eval-prose (held-out English prose), "
        "a .jsonl/.txt file or a folder",
    )
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
    st = ev.add_mutually_exclusive_group()
    st.add_argument(
        "--stream",
        dest="stream",
        action="store_const",
        const=True,
        default=None,
        help="evaluate layer by layer, one decoder layer read from the shards at a time (default: only when "
        "the whole model would not fit in 70%% of the available memory)",
    )
    st.add_argument("--no-stream", dest="stream", action="store_const", const=False, help="always load the model whole")
    _add_read_flags(ev)
    ev.set_defaults(fn=_cmd_eval)


def _cmd_inspect(args: argparse.Namespace) -> int:
    from calibra.export.inspect import format_report, inspect

    info = inspect(args.dir, verify=args.verify)
    print(json.dumps(info, indent=2, default=str) if args.json else format_report(info))
    return 1 if args.verify and not info["verified"] else 0


def _quant_config(args: argparse.Namespace):
    """The config dataclass from the flags; validated by calibra.quantize before anything loads."""
    from calibra.quant import GPTQConfig, MRGPTQConfig, RTNConfig

    fmt = args.format
    clip = args.clip
    if args.mse_clip:
        if clip not in (None, "mse"):
            raise ValueError(f"[quantize] --mse-clip is --clip mse; it contradicts --clip {clip}")
        clip = "mse"
    mse_clip = clip in ("mse", "output-mse")
    clip_metric = "output" if clip == "output-mse" else "weight"
    awq = bool(getattr(args, "awq", False))
    gptaq = bool(getattr(args, "gptaq", False))
    if gptaq and args.method != "gptq":
        raise ValueError(f"[quantize] --gptaq is an option of --method gptq, not {args.method}")
    if args.method == "mr-gptq":
        if awq:
            raise ValueError(
                "[quantize] --awq works with --method rtn or gptq, not mr-gptq (its rotation mixes channels)"
            )
        if fmt == "int":
            raise ValueError("[quantize] --method mr-gptq needs --format mxfp4 or nvfp4 (it rotates onto an FP4 grid)")
        mr_clip = {} if clip is None else {"mse": mse_clip, "clip_metric": clip_metric}
        return MRGPTQConfig(
            format=fmt,
            **mr_clip,
            desc_act=args.desc_act,
            static_groups=args.static_groups,
            damp_percent=args.damp,
            block_size=args.block_size,
            true_sequential=not args.no_true_sequential,
            choose=not getattr(args, "rotate_all", False),
            candidates=getattr(args, "mr_candidates", "quick"),
        )
    group = args.group_size
    if fmt != "int" and group is None:
        group = {"mxfp4": 32, "nvfp4": 16}[fmt]
    group = 128 if group is None else group
    bits = 4 if fmt != "int" else args.bits
    if args.method == "rtn":
        return RTNConfig(
            bits=bits,
            group_size=group,
            sym=not args.asym,
            format=fmt,
            mse_clip=mse_clip,
            clip_metric=clip_metric,
            awq=awq,
        )
    return GPTQConfig(
        bits=bits,
        group_size=group,
        sym=not args.asym,
        desc_act=args.desc_act,
        static_groups=args.static_groups,
        damp_percent=args.damp,
        block_size=args.block_size,
        true_sequential=not args.no_true_sequential,
        format=fmt,
        mse_clip=mse_clip,
        clip_metric=clip_metric,
        awq=awq,
        gptaq=gptaq,
    )


def _export_dense_line(dense: dict) -> str:
    """report.json's ``summary.export_dense`` in one line: how many, the reasons, a few module names."""
    names = sorted(dense)
    reasons = sorted(set(dense.values()))
    shown = ", ".join(names[:3]) + (f", ... ({len(names)} in all)" if len(names) > 3 else "")
    return f"{shown} -- {'; '.join(reasons[:2])}" + (" ..." if len(reasons) > 2 else "")


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _eval_rows(ev: dict | None, kl_label: str) -> list[tuple[str, str]]:
    """Summary rows for a report's ``eval`` block (quantize and prune share its shape: EvalSession)."""
    if not ev:
        return []
    p, kl, proto = ev["perplexity"], ev["kl_divergence"], ev["protocol"]
    top_k = f"-{kl['top_k']}" if kl["top_k"] else ""
    return [
        (
            "perplexity",
            f"{p['baseline']:.4f} -> {p['compressed']:.4f} ({(p['compressed'] / p['baseline'] - 1) * 100:+.2f}%)",
        ),
        (
            kl_label,
            f"mean {kl['mean']:.5f}  median {kl['median']:.5f}  max {kl['max']:.4f} nats/token ({kl['mode']}{top_k})",
        ),
        (
            "eval protocol",
            f"seq_len {proto['seq_len']}, stride {proto['stride']}, "
            f"{proto['tokens_scored']} tokens of {proto['dataset']['name']}",
        ),
    ]


def _print_rows(rows: list[tuple[str, str]], output: str | None) -> None:
    """The end-of-run summary table: one aligned ``name  value`` line per row."""
    if output:
        rows = rows + [("output", output)]
    w = max(len(r[0]) for r in rows)
    for k, v in rows:
        print(f"  {k:<{w}}  {v}")


def _print_quant_summary(report: dict) -> None:
    s, t = report["summary"], report["timings"]
    q = s["quantized_weights"]
    st = report["settings"]
    what = f"scheme {st['scheme']}" if st.get("scheme") else f"{st['method']} ({st['config'].get('format', 'int')})"
    if st.get("kv_cache"):
        what += f", {st['kv_cache']} KV cache"
    print(f"calibra quantize: {report['model']['source']} with {what}")
    rows = [
        (
            "modules quantized",
            f"{s['quantized_modules']}" + (f" ({len(s['dense_modules'])} kept dense)" if s["dense_modules"] else ""),
        ),
    ]
    if s.get("export_dense"):  # widths an export format cannot hold: which, and why
        rows.append(("kept dense for export", _export_dense_line(s["export_dense"])))
    rows += [
        ("bits per weight", f"{s['avg_bits_per_weight']:.3f}" if s["avg_bits_per_weight"] else "-"),
        ("quantized weights", f"{_fmt_bytes(q * 2)} as fp16 -> {_fmt_bytes(q * (s['avg_bits_per_weight'] or 16) / 8)}"),
    ]
    rows += _eval_rows(report.get("eval"), "KL(ref||quant)")
    rows.append(
        (
            "time",
            f"{t['total']:.1f} s (calibration {t['calibration']:.1f}, solve {t['solve']:.1f}, eval {t['eval']:.1f})",
        )
    )
    _print_rows(rows, report.get("output"))


def _cmd_quantize(args: argparse.Namespace) -> int:
    from calibra.api import quantize
    from calibra.data import CalibrationConfig

    if getattr(args, "preset", None) is not None and args.scheme is None:
        if args.method not in (None, "gptq"):
            raise ValueError(
                f"[quantize] --preset {args.preset} is a GPTQ recipe; it does not take --method {args.method}"
            )
        args.method = "gptq"
    scheme_check(args)
    config = None if args.scheme and args.method is None else _quant_config(args)
    calibration = CalibrationConfig(
        num_samples=args.samples,
        sequence_length=args.seq_len,
        batch_size=args.batch_size,
        dataset=args.calibration,
        seed=args.seed,
    )
    from calibra.quant.act_ranges import is_ranges_file

    if is_ranges_file(args.calibration):
        calibration = args.calibration
    evaluate = True if args.eval else (False if args.no_eval else None)
    _, report = quantize(
        args.input,
        config,
        calibration,
        scheme=args.scheme,
        act_observer=args.act_observer,
        act_clip_percentile=args.act_clip_percentile,
        smoothquant=args.smoothquant,
        kv_cache=args.kv_cache,
        stats=args.stats,
        output=args.output,
        overwrite=args.overwrite,
        evaluate=evaluate,
        act_ranges=args.act_ranges,
        mixed_precision=args.mixed_precision,
        device=args.device,
        dtype=args.dtype,
        hessian_dtype=args.hessian_dtype,
        eval_max_tokens=args.eval_max_tokens or None,
        eval_seq_len=args.eval_seq_len,
        export=args.export,
        progress=not args.no_progress,
        resume=args.resume,
        checkpoint=False if args.no_checkpoint else None,  # None: on when writing an output
        dry_run=args.dry_run,
        stream=args.stream,
        preset=getattr(args, "preset", None),
        **_read_opts(args),
    )
    if args.dry_run or not _writer_rank():
        return 0
    _print_quant_summary(report)
    return 0


# the weight-only flags a --scheme (a complete recipe) does not take: (dest, flag, default)
_WEIGHT_ONLY_FLAGS = (
    ("bits", "--bits", 4),
    ("group_size", "--group-size", None),
    ("format", "--format", "int"),
    ("asym", "--asym", False),
    ("mse_clip", "--mse-clip", False),
    ("awq", "--awq", False),
    ("gptaq", "--gptaq", False),
    ("desc_act", "--desc-act", False),
    ("static_groups", "--static-groups", False),
    ("damp", "--damp", 0.01),
    ("block_size", "--block-size", 128),
    ("no_true_sequential", "--no-true-sequential", False),
    ("stats", "--stats", None),
    ("act_ranges", "--act-ranges", False),
    ("mixed_precision", "--mixed-precision", None),
)


# what --scheme nvfp4 / mxfp4 with --method (its weights' solver) still refuses: the format is the scheme's
_FP4_SCHEME_FIXED = ("bits", "group_size", "format", "asym", "awq", "stats", "act_ranges", "mixed_precision")


def scheme_check(args: argparse.Namespace) -> None:
    """--method xor --scheme (but a W4A4 scheme may name its weights' solver), and no weight-only flag with
    --scheme: refused before anything loads."""
    fp4 = args.scheme in ("nvfp4", "mxfp4")
    if args.scheme is None and args.method is None or (args.method is not None and args.scheme and not fp4):
        raise ValueError(
            "[quantize] give exactly one of --method (rtn, gptq, mr-gptq: weight-only) and --scheme (fp8, "
            "fp8-dynamic, w8a8, w8a8-static, nvfp4, mxfp4: weights + activations; --scheme nvfp4 / mxfp4 "
            "also take --method rtn or gptq for their weights)"
        )
    if args.scheme is not None:
        fixed = _FP4_SCHEME_FIXED if args.method is not None else None
        given = [
            flag
            for dest, flag, default in _WEIGHT_ONLY_FLAGS
            if getattr(args, dest) != default and (fixed is None or dest in fixed)
        ]
        if given:
            raise ValueError(
                f"[quantize] --scheme {args.scheme} is a complete recipe (its weights included): "
                f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to it; drop "
                f"{'it' if len(given) == 1 else 'them'}"
            )
        if fp4 and args.method is not None:
            args.format = args.scheme  # the solver's grid is the scheme's (config built by _quant_config)


def _add_quantize(sub) -> None:
    D = _HelpFormatter
    q = sub.add_parser(
        "quantize",
        formatter_class=D,
        help="quantize a model (RTN, GPTQ, MR-GPTQ) and write it with report.json",
        description="Quantize MODEL's decoder Linears and experts (lm_head, embeddings and routers "
        "stay dense) and write the result into DIR atomically: quantized.safetensors "
        "(codes, scales, zeros, g_idx, global scales + every dense tensor), "
        "quantization.json, config.json, the tokenizer and report.json (settings, "
        "versions, timings, per-module log, evaluation). Every setting is checked "
        "before the model loads; nothing is written on error.",
    )
    q.add_argument("--input", required=True, help="builtin:NAME or a local Hugging Face model folder")
    q.add_argument("--output", required=True, help="output folder DIR (refused if it exists, see --overwrite)")
    q.add_argument(
        "--method",
        default=None,
        choices=["rtn", "gptq", "mr-gptq"],
        help="rtn: round-to-nearest (data-free); gptq: GPTQ on calibration Hessians; mr-gptq: "
        "block-Hadamard-rotated GPTQ onto an FP4 grid (weight-only; give --method or --scheme)",
    )
    q.add_argument(
        "--scheme",
        default=None,
        choices=["fp8", "fp8-dynamic", "w8a8", "int8", "w8a8-static", "nvfp4", "mxfp4"],
        help="an activation-quantized recipe instead of --method: fp8-dynamic = FP8 weights per channel + "
        "per-token FP8 inputs (data-free); fp8 = the same weights + static per-tensor FP8 input scales "
        "calibrated on --calibration; w8a8 (alias int8) = int8 weights per channel by GPTQ + per-token int8 "
        "inputs, SmoothQuant strength searched per layer (--smoothquant); w8a8-static = the same with static "
        "per-tensor int8 input scales; nvfp4 = NVFP4 W4A4 (NVFP4 weights, NVFP4 inputs with per-16 scales "
        "under a calibrated global scale); mxfp4 = MXFP4 W4A4 (dynamic MXFP4 inputs); the W4A4 schemes take "
        "--method rtn (default) or gptq for their weights (docs/activation_quant.md)",
    )
    q.add_argument(
        "--smoothquant",
        default=None,
        metavar="search|off|ALPHA",
        help="--scheme w8a8 / w8a8-static: search (default) = per smoothing group (q/k/v, gate/up) the "
        "migration strength with the least measured int8 output error on the calibration data, no "
        "smoothing included; off = none; a number in [0, 1] = that fixed alpha everywhere",
    )
    q.add_argument(
        "--act-observer",
        default="absmax",
        choices=["absmax", "percentile", "mse"],
        help="--scheme fp8 / w8a8-static: each static input scale from the absmax (default), from the "
        "--act-clip-percentile percentile of the calibration inputs' magnitudes (larger values saturate), or "
        "mse: the shrink factor of the absmax (1, 0.95, ..., 0.25) with the least measured quantization error "
        "on the calibration inputs",
    )
    q.add_argument(
        "--act-clip-percentile",
        type=float,
        default=99.99,
        help="with --act-observer percentile (default 99.99)",
    )
    q.add_argument(
        "--kv-cache",
        default=None,
        choices=["fp8"],
        help="fp8: calibrate per-layer k/v scales and quantize the KV cache (any --method or --scheme)",
    )
    q.add_argument("--bits", type=int, default=4, help="integer bits 2..8 (--format int; FP4 formats are 4-bit)")
    q.add_argument(
        "--group-size",
        type=int,
        default=None,
        help="columns per scale group, -1 = one per row "
        "(per-channel); default 128 for int, 32 for mxfp4, 16 for nvfp4 (fixed by the format); an int group "
        "that does not divide a width leaves a ragged last group (kept dense for an --export that cannot hold it)",
    )
    q.add_argument("--format", default="int", choices=["int", "mxfp4", "nvfp4"], help="number format")
    q.add_argument("--asym", action="store_true", help="asymmetric int grid (zero points); default symmetric")
    q.add_argument(
        "--clip",
        default=None,
        choices=["none", "mse", "output-mse"],
        help="clipping search per group: none (min/max, the default for rtn/gptq); mse: by the weight's "
        "squared error (AutoGPTQ's; mr-gptq's default); output-mse: by the error weighted by each input "
        "channel's activation energy, kept per layer only where it lowers the measured output error "
        "(RTN then calibrates too)",
    )
    q.add_argument("--mse-clip", action="store_true", help="the same as --clip mse")
    q.add_argument(
        "--awq",
        action="store_true",
        help="rtn/gptq: AWQ -- per-channel scales searched per layer on the calibration Hessians and folded into "
        "the preceding norm / v_proj / up_proj before solving (the output stays an ordinary checkpoint; RTN then "
        "calibrates too); per group the alpha and the loss before/after go to report.json",
    )
    q.add_argument(
        "--preset",
        default=None,
        choices=["best"],
        help="best: the combination measured best for int GPTQ (docs/quantize.md): act-order (static groups) "
        "GPTAQ, each Linear keeping the least of four solves (GPTQ, GPTAQ, each with and without the weight-MSE "
        "clip) by its measured error against the full-precision model on the calibration tokens (recorded per "
        "module); implies --method gptq, --desc-act --static-groups, and keeps --bits/--group-size...",
    )
    q.add_argument(
        "--gptaq",
        action="store_true",
        help="gptq: GPTAQ (asymmetric calibration) -- each Linear's solve also corrects for the difference between "
        "its inputs in the quantized and in the full-precision model (a second, full-precision stream runs beside "
        "the calibration pass; MoE experts stay plain GPTQ)",
    )
    q.add_argument(
        "--rotate-all",
        action="store_true",
        help="mr-gptq: rotate every Linear (the paper's method alone); by default each Linear keeps whichever "
        "of rotated GPTQ, unrotated GPTQ and RTN has the least measured output error on its calibration "
        "inputs, recorded per layer in report.json",
    )
    q.add_argument(
        "--mr-candidates",
        choices=["quick", "all"],
        default="quick",
        help="mr-gptq's per-Linear choice: quick (rotated and unrotated GPTQ with the scale search, and RTN; "
        "about 2-3x the rotated solve) or all (each GPTQ also with every FP4 scale search: 7 candidates, "
        "tens of times slower)",
    )
    q.add_argument(
        "--calibration",
        default="builtin",
        help="calibration text: builtin (= builtin:calibration: mixed-domain text; "
        "builtin:code: the Python-only set calibra used up to 0.1.0), a .txt/.json/.jsonl file "
        "or folder, a hub set name; or an activation_ranges.json written by --act-ranges (RTN)",
    )
    add_sample_flags(q)
    q.add_argument(
        "--desc-act",
        action="store_true",
        help="GPTQ act-order: columns by descending Hessian "
        "diagonal (records g_idx unless --static-groups). --desc-act --static-groups is the best-quality "
        "setting that every kernel loads (25%% lower KL on builtin:tiny-llama W4 g128)",
    )
    q.add_argument(
        "--static-groups",
        action="store_true",
        help="with --desc-act: fit groups before the sweep so groups stay contiguous (no g_idx)",
    )
    q.add_argument(
        "--damp",
        type=float,
        default=0.01,
        help="GPTQ damping, fraction of mean(diag H); a failed Cholesky climbs the ladder 0.1, 1, 10, then float64",
    )
    q.add_argument("--block-size", type=int, default=128, help="GPTQ lazy-batch columns")
    q.add_argument(
        "--no-true-sequential",
        action="store_true",
        help="GPTQ: solve all modules of a layer from "
        "one set of Hessians instead of re-collecting them after q/k/v, o, gate/up",
    )
    q.add_argument(
        "--stats",
        default=None,
        help="statistics file from `calibra calibrate` (GPTQ with --no-true-sequential: no forward pass)",
    )
    q.add_argument(
        "--act-ranges",
        action="store_true",
        help="RTN: collect activation ranges, fold SmoothQuant "
        "factors (alpha 0.5) into the norms, write DIR/activation_ranges.json",
    )
    q.add_argument(
        "--mixed-precision",
        type=float,
        default=None,
        metavar="BUDGET_BITS",
        help="bits-per-weight budget (e.g. 4.5): promote the most sensitive modules to 8-bit "
        "(dense for FP4) while the average stays within it",
    )
    _add_eval_flags(q)
    q.add_argument(
        "--export",
        default=None,
        help="engine format(s) written into DIR instead of calibra's own folder: compressed-tensors, gptq, mlx, "
        "gguf-q4_0, gguf-q8_0, dense (comma-separated: one subfolder each); checked against the "
        "quantized model before anything is written",
    )
    q.add_argument("--overwrite", action="store_true", help="replace an existing output folder (whole)")
    q.add_argument("--device", default=None, help="compute device (cpu, cuda, cuda:1); default cuda if available")
    q.add_argument("--dtype", default="float32", help="dtype the model is loaded and run in")
    _add_hessian_dtype(q)
    add_stream_flags(q)
    q.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_dry_run(q)
    _add_resume_flags(q, "codes")
    _add_read_flags(q)
    q.set_defaults(fn=_cmd_quantize)


def _prune_config(args: argparse.Namespace):
    """The PruningConfig from the flags; validated by calibra.prune before anything loads."""
    from calibra.prune import JointQuant, PruningConfig

    pattern = args.pattern
    nm = ":" in pattern
    if nm and args.sparsity is not None:
        raise ValueError(
            f"[prune] pattern {pattern} fixes the sparsity; drop --sparsity (or use --pattern "
            f"unstructured with --sparsity)"
        )
    sparsity = None if nm else (0.5 if args.sparsity is None else args.sparsity)
    jq = None
    if args.bits is not None:
        jq = JointQuant(bits=args.bits, group_size=args.group_size, sym=not args.asym)
    return PruningConfig(
        method=args.method,
        target_sparsity=sparsity,
        pattern=pattern,
        scope=args.scope,
        gradual_steps=args.gradual_steps,
        skip_indivisible=args.skip_indivisible,
        block_size=args.block_size,
        damp_percent=args.damp,
        quantize=jq,
    )


def _print_prune_summary(report: dict) -> None:
    s, t, st = report["summary"], report["timings"], report["settings"]
    jq = st["joint_quantization"]
    print(
        f"calibra prune: {report['model']['source']} with {st['method']} ({st['pattern']}"
        + (f", W{jq['bits']} g{jq['group_size']}" if jq else "")
        + ")"
    )
    rows = [
        (
            "modules pruned",
            f"{s['pruned_modules']}" + (f" ({len(s['dense_modules'])} kept dense)" if s["dense_modules"] else ""),
        ),
        (
            "sparsity",
            f"target {s['target_sparsity']:.4f}, achieved {s['achieved_sparsity']:.4f} "
            f"({s['zeroed_weights']} of {s['pruned_weights_total']} weights zeroed)",
        ),
    ]
    errs = [m["reconstruction_error"] for m in report["modules"] if m.get("reconstruction_error") is not None]
    if errs:
        rows.append(
            (
                "reconstruction err",
                f"mean {sum(errs) / len(errs):.5f}, max {max(errs):.5f} "
                f"(relative output error on the calibration inputs)",
            )
        )
    rows += _eval_rows(report.get("eval"), "KL(dense||pruned)")
    rows.append(
        (
            "time",
            f"{t['total']:.1f} s (calibration {t['calibration']:.1f}, solve {t['solve']:.1f}, "
            f"eval {t['eval']:.1f}, write {t['write']:.1f})",
        )
    )
    _print_rows(rows, report.get("output"))


def _cmd_prune(args: argparse.Namespace) -> int:
    from calibra.api import prune
    from calibra.data import CalibrationConfig

    config = _prune_config(args)
    calibration = CalibrationConfig(
        num_samples=args.samples,
        sequence_length=args.seq_len,
        batch_size=args.batch_size,
        dataset=args.calibration,
        seed=args.seed,
    )
    evaluate = True if args.eval else (False if args.no_eval else None)
    _, report = prune(
        args.input,
        config,
        calibration,
        output=args.output,
        overwrite=args.overwrite,
        save_24=args.save_24,
        evaluate=evaluate,
        device=args.device,
        dtype=args.dtype,
        eval_max_tokens=args.eval_max_tokens or None,
        eval_seq_len=args.eval_seq_len,
        progress=not args.no_progress,
        dry_run=args.dry_run,
        resume=args.resume,
        checkpoint=not args.no_checkpoint,
        stream=args.stream,
        hessian_dtype=args.hessian_dtype,
        **_read_opts(args),
    )
    if args.dry_run or not _writer_rank():
        return 0
    _print_prune_summary(report)
    return 0


def _add_hessian_dtype(parser) -> None:
    parser.add_argument(
        "--hessian-dtype",
        default="float32",
        choices=["float32", "float64"],
        help="Hessian (and channel-norm) sums; float64 under torchrun, where the sum over the ranks then does "
        "not depend on their number",
    )


def _add_prune(sub) -> None:
    D = _HelpFormatter
    p = sub.add_parser(
        "prune",
        formatter_class=D,
        help="prune a model (magnitude, Wanda, SparseGPT) and write it with report.json",
        description="Prune MODEL's decoder Linears and experts (lm_head, embeddings and routers stay "
        "dense) and write the result into DIR atomically: dense safetensors (zeros "
        "included) with config.json's calibra_sparsity block, the tokenizer, "
        "sparsity.json, report.json (settings, versions, timings, per-module achieved "
        "sparsity and reconstruction error, stages, evaluation) and, with --save-24, "
        "sparse24.safetensors. Every setting is checked before the model loads; nothing "
        "is written on error.",
    )
    p.add_argument("--input", required=True, help="builtin:NAME or a local Hugging Face model folder")
    p.add_argument("--output", required=True, help="output folder DIR (refused if it exists, see --overwrite)")
    p.add_argument(
        "--method",
        required=True,
        choices=["magnitude", "wanda", "sparsegpt"],
        help="magnitude: |w| (data-free); wanda: |w| * ||X_j|| per output row; sparsegpt: OBS sweep with "
        "the calibration Hessian and error compensation",
    )
    p.add_argument(
        "--sparsity",
        type=float,
        default=None,
        help="fraction of weights set to zero, in (0, 1), for "
        "unstructured and block patterns (default 0.5); N:M patterns fix it at 1 - n/m",
    )
    p.add_argument(
        "--pattern",
        default="unstructured",
        help="unstructured, n:m (2:4, 4:8: n kept of every m input channels) or block:RxC",
    )
    p.add_argument(
        "--scope",
        default=None,
        choices=["row", "layer"],
        help="where scores compete (default: layer for magnitude, row for wanda; sparsegpt selects per column block)",
    )
    p.add_argument(
        "--bits",
        type=int,
        default=None,
        help="sparsegpt: also quantize the kept weights to this many "
        "integer bits (2..8) in the same sweep (joint mode); stored dequantized, recorded in the report",
    )
    p.add_argument(
        "--group-size",
        type=int,
        default=128,
        help="joint quantization: columns per scale group (-1 = one group per row)",
    )
    p.add_argument("--asym", action="store_true", help="joint quantization: asymmetric grid (zero points)")
    p.add_argument("--block-size", type=int, default=128, help="sparsegpt: columns per lazy batch")
    p.add_argument(
        "--damp",
        type=float,
        default=0.01,
        help="sparsegpt: damping, fraction of mean(diag H); a "
        "failed Cholesky climbs the ladder 0.1, 1, 10, then float64",
    )
    p.add_argument(
        "--gradual-steps",
        type=int,
        default=1,
        help="reach the sparsity in this many pruning steps, "
        "re-collecting the layer's statistics in between (1 = one-shot)",
    )
    p.add_argument(
        "--skip-indivisible",
        action="store_true",
        help="leave layers whose width the pattern does not divide dense (recorded in the report) instead of failing",
    )
    p.add_argument(
        "--save-24",
        action="store_true",
        help="also write sparse24.safetensors: calibra's compressed "
        "2:4 form (values + metadata per module; pattern 2:4)",
    )
    p.add_argument(
        "--calibration",
        default="builtin",
        help="calibration text (wanda, sparsegpt): builtin (= builtin:calibration: mixed-domain text; "
        "builtin:code: the Python-only set calibra used up to 0.1.0), "
        "a .txt/.json/.jsonl file or folder, or a hub set name",
    )
    add_sample_flags(p)
    _add_eval_flags(p)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder (whole)")
    p.add_argument("--device", default=None, help="compute device (cpu, cuda, cuda:1); default cuda if available")
    p.add_argument("--dtype", default="float32", help="dtype the model is loaded, pruned and saved in")
    _add_hessian_dtype(p)
    add_stream_flags(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    _add_dry_run(p)
    _add_resume_flags(p, "pruned weights")
    _add_read_flags(p)
    p.set_defaults(fn=_cmd_prune)


def build_parser() -> argparse.ArgumentParser:
    from calibra import __version__

    p = argparse.ArgumentParser(prog="calibra", description="Calibration-driven compression for LLMs.")
    p.add_argument(
        "--version",
        action="version",
        version=f"calibra {__version__}",
        help="print the version and exit (`calibra info` adds torch and the native backends)",
    )
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="which native backends loaded, and why not for the others")
    info.add_argument("--json", action="store_true", help="print the full build_info() as JSON")
    info.set_defaults(fn=_cmd_info)
    st = sub.add_parser("selftest", help="run every op natively and compare it with its reference")
    st.add_argument("--device", default="cpu", help="device to test (default: cpu)")
    st.set_defaults(fn=_cmd_selftest)
    D = _HelpFormatter
    cal = sub.add_parser(
        "calibrate",
        formatter_class=D,
        help="run calibration text through a model and save reusable statistics",
        description="Run calibration text through MODEL one decoder layer at a time and save "
        "the statistics (Hessians, norms, ranges, K/V covariances, MoE routing) "
        "as one safetensors file that quantize/prune can reuse.",
    )
    cal.add_argument("--input", required=True, help="builtin:NAME or a local Hugging Face model folder")
    cal.add_argument("--output", required=True, help="statistics file to write (.safetensors, atomic)")
    cal.add_argument(
        "--calibration",
        default="builtin",
        help="calibration text: builtin (= builtin:calibration: mixed-domain text; "
        "builtin:code: the Python-only set calibra used up to 0.1.0), "
        "a .txt/.json/.jsonl file or folder, or a hub set name",
    )
    add_sample_flags(cal)
    cal.add_argument("--observers", default="hessian", help="comma-separated: hessian,norms,ranges,kv")
    cal.add_argument(
        "--device",
        default=None,
        help="compute device for one layer at a time (cpu, cuda, cuda:1); default: cuda if available, else cpu",
    )
    cal.add_argument(
        "--dtype", default="float32", help="dtype the model is loaded and run in (float32, bfloat16, float16, auto)"
    )
    cal.add_argument(
        "--hessian-dtype",
        default="float32",
        choices=["float32", "float64"],
        help="dtype of the Hessian sums (float64 merges bit-for-bit more often)",
    )
    cal.add_argument(
        "--moe-quota",
        type=int,
        default=None,
        help="tokens every expert should see: adds "
        "samples by router-guided selection from a 4x candidate pool (MoE models)",
    )
    cal.add_argument(
        "--moe-tau",
        type=float,
        default=256.0,
        help="expert Hessian shrinkage: weight tau/(n+tau) on the layer's pooled Hessian for an expert with n tokens",
    )
    cal.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_dry_run(cal)
    _add_read_flags(cal)
    cal.set_defaults(fn=_cmd_calibrate)

    _add_eval(sub)
    ins = sub.add_parser(
        "inspect",
        help="describe an exported checkpoint (format, bits, group size, sparsity, "
        "sizes, producer); --verify checks the manifest's sha256 of every file",
    )
    ins.add_argument("dir", help="checkpoint folder (or a .gguf file)")
    ins.add_argument(
        "--verify",
        action="store_true",
        help="re-hash every file listed in calibra_manifest.json; exit 1 on any mismatch",
    )
    ins.add_argument("--json", action="store_true", help="print the full description as JSON")
    ins.set_defaults(fn=_cmd_inspect)
    _add_quantize(sub)
    _add_prune(sub)
    from calibra.kv.cli import add_parser as _add_kv  # the `calibra kv ...` group lives with calibra.kv

    _add_kv(sub)
    from calibra.report.cli import add_parser as _add_report  # `calibra report` lives with calibra.report

    _add_report(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Run one command; errors propagate as exceptions (for tests and for embedding). The ``calibra``
    executable runs :func:`run`, which prints them."""
    args = build_parser().parse_args(argv)
    return args.fn(args)


# What a user can cause and fix: bad settings or inputs (ValueError and its subclasses ModelReadError,
# ResumeError, ExportError...), files (OSError), unsupported cases, non-finite activations, out of memory.
# Anything else is a bug in calibra and keeps its traceback.
def _user_errors() -> tuple:
    import torch

    from calibra.calib.runner import CalibrationOOMError
    from calibra.data.hub import HubUnavailableError

    return (
        ValueError,
        OSError,
        NotImplementedError,
        FloatingPointError,
        CalibrationOOMError,
        HubUnavailableError,
        torch.OutOfMemoryError,
    )


def run(argv: list[str] | None = None) -> int:
    """The ``calibra`` executable: :func:`main`, with a user error printed as one ``calibra: error:`` line
    (exit 2) instead of a traceback, and Ctrl-C as exit 130. ``CALIBRA_TRACEBACK=1`` shows tracebacks."""
    from calibra.jobs.distributed import rank_label, shutdown

    try:
        return main(argv)
    except KeyboardInterrupt as e:
        print(f"calibra{rank_label()}: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("CALIBRA_TRACEBACK") or not isinstance(e, _user_errors()):
            raise
        print(f"calibra{rank_label()}: error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown()


if __name__ == "__main__":
    sys.exit(run())
