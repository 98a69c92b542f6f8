"""``calibra kv calibrate`` and ``calibra kv eval`` (registered by ``calibra.cli``). Thin: parse, call
``calibra.kv``, print."""

from __future__ import annotations

import argparse

from calibra.cli_flags import add_sample_flags

#: exit status when auto-tuning finds no compression within the budget (no preset is written)
EXIT_NO_FIT = 3


def _print_quality(q: dict, ranks: dict) -> None:
    p, kl, mem, pr = q["perplexity"], q["kl_divergence"], q["memory"], q["protocol"]
    for w in ("v", "k"):
        if w in ranks:
            print(f"  {w.upper()} ranks      {ranks[w]}")
    print(
        f"  perplexity   {p['baseline']:.4f} -> {p['compressed']:.4f} (increase {p['increase']:+.4f}, "
        f"{(p['compressed'] / p['baseline'] - 1) * 100:+.3f}%)"
    )
    print(
        f"  KL(ref||kv)  mean {kl['mean']:.6f}  median {kl['median']:.6f}  max {kl['max']:.4f} nats/token "
        f"(top-{kl['top_k']})"
    )
    d, c = mem["dense"], mem["compressed"]
    print(
        f"  cache bytes  {c['total']} of {d['total']} for {mem['tokens']} tokens (measured): ratio "
        f"{mem['ratio']:.4f}, saving {mem['saving'] * 100:.1f}% (V {c['v']}/{d['v']}, K {c['k']}+{c['positions']} "
        f"positions/{d['k']})"
    )
    print(
        f"  protocol     {pr['dataset']['name']}, seq_len {pr['seq_len']}, stride {pr['stride']}, "
        f"{pr['tokens_scored']} tokens scored"
    )


def _cmd_calibrate(args: argparse.Namespace) -> int:
    import calibra.kv as kv
    from calibra.data import CalibrationConfig

    config = CalibrationConfig(
        num_samples=args.samples,
        sequence_length=args.seq_len,
        batch_size=args.batch_size,
        dataset=args.calibration,
        seed=args.seed,
    )
    try:
        preset = kv.calibrate(
            args.input,
            config,
            rank=args.rank,
            targets=args.targets,
            target_ppl_delta=args.target_ppl_delta,
            target_kl=args.target_kl,
            output=args.output,
            overwrite=args.overwrite,
            device=args.device,
            dtype=args.dtype,
            evaluate=not args.no_eval,
            eval_seq_len=args.eval_seq_len,
            eval_max_tokens=args.eval_max_tokens,
            tune_max_tokens=args.tune_max_tokens,
            progress=not args.no_progress,
        )
    except kv.NoCompressionFits as e:
        print(str(e))
        print(f"no preset written (exit status {EXIT_NO_FIT})")
        return EXIT_NO_FIT
    from calibra.jobs.distributed import current_world

    if not current_world().writer:  # the other ranks of a torch.distributed job print nothing
        return 0
    print(
        f"calibra kv calibrate: {args.input}, targets {preset.targets}, wrote {args.output} (+ "
        f"{preset.path.with_suffix('.safetensors').name})"
    )
    if preset.autotune:
        a = preset.autotune
        print(
            f"auto-tune ({a['metric_description']} budget {a['budget']}), measured on {a['tuning']['tokens']} "
            f"tokens of calibration text (rows: slot, columns: rank; other slots at full rank):"
        )
        print(kv.sensitivity_table(a))
        print(
            f"  tuned: {a['tuning']['tokens']}-token tuning text {a['tuned_value']:+.4f}"
            + (
                f"; eval text {a['verified']['value']:+.4f} ({'within' if a['verified']['within_budget'] else 'OVER'}"
                f" budget)"
                if a.get("verified")
                else ""
            )
        )
    if preset.quality:
        _print_quality(preset.quality, preset.ranks)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import calibra.kv as kv

    ranks = None
    preset = kv.load_preset(args.preset)
    if args.rank is not None:
        ranks = {w: [args.rank] * preset.plan.num_layers for w in preset.plan.bases}
    q = kv.evaluate(
        args.input,
        preset,
        device=args.device,
        dtype=args.dtype,
        dataset=args.dataset,
        seq_len=args.seq_len,
        max_tokens=args.max_tokens,
        ranks=ranks,
        progress=not args.no_progress,
    )
    print(f"calibra kv eval: {args.input} with {args.preset} (targets {q['targets']})")
    _print_quality(q, q["ranks"])
    return 0


def add_parser(sub) -> None:
    D = argparse.ArgumentDefaultsHelpFormatter
    kvp = sub.add_parser(
        "kv",
        help="KV-cache compression: calibrate PCA presets, evaluate them",
        description="Compress the KV cache with per-layer, per-KV-head PCA bases of V (and "
        "pre-RoPE K), calibrated from the K/V covariance observer. A preset is a JSON "
        "file (model, targets, ranks per layer, calibration data, measured quality) "
        "with the bases in a .safetensors file beside it.",
    )
    kvsub = kvp.add_subparsers(dest="kv_command", required=True)
    c = kvsub.add_parser(
        "calibrate",
        formatter_class=D,
        help="calibrate a preset at a fixed rank or auto-tune ranks per layer within a quality budget",
        description="One calibration pass (kv observer), PCA per layer and KV head, then either "
        "--rank R for every layer or an auto-tuned rank per layer: the largest cache "
        "saving whose measured quality cost on calibration text stays within "
        "--target-ppl-delta (absolute perplexity increase) or --target-kl (mean KL, "
        "nats/token); the result is verified on the held-out eval text. When no "
        f"compression fits the budget nothing is written and the exit status is "
        f"{EXIT_NO_FIT}.",
    )
    c.add_argument("--input", required=True, help="builtin:NAME or a local Hugging Face model folder")
    c.add_argument(
        "--output",
        required=True,
        help="preset JSON path, e.g. kv_preset_tiny-llama.json (the bases go beside it as .safetensors)",
    )
    mode = c.add_mutually_exclusive_group(required=True)
    mode.add_argument("--rank", type=int, default=None, help="keep R of head_dim dimensions per KV head in every layer")
    mode.add_argument(
        "--target-ppl-delta",
        type=float,
        default=None,
        help="auto-tune: largest saving with a perplexity increase <= D (absolute, e.g. 0.05)",
    )
    mode.add_argument(
        "--target-kl",
        type=float,
        default=None,
        help="auto-tune: largest saving with mean KL(uncompressed||compressed) <= K nats/token",
    )
    c.add_argument(
        "--targets",
        default="v",
        choices=["v", "kv"],
        help="v: values only (standard attention default); kv: keys (pre-RoPE) and values",
    )
    c.add_argument(
        "--calibration",
        default="builtin",
        help="calibration text: builtin (= builtin:calibration: mixed-domain text; "
        "builtin:code: the Python-only set calibra used up to 0.1.0), "
        "a .txt/.json/.jsonl file or folder, or a hub set name",
    )
    add_sample_flags(c)
    c.add_argument(
        "--tune-max-tokens",
        type=int,
        default=8192,
        help="auto-tune: tokens of calibration text every candidate is measured on",
    )
    c.add_argument("--no-eval", action="store_true", help="do not measure the preset on the eval text")
    c.add_argument(
        "--eval-seq-len",
        type=int,
        default=None,
        help="eval/tuning window (default: a built-in model's "
        "trained length, 256; else the model's context capped at 2048)",
    )
    c.add_argument("--eval-max-tokens", type=int, default=None, help="measure on the first N eval tokens (default all)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing preset")
    c.add_argument("--device", default=None, help="compute device (cpu, cuda, cuda:1); default cuda if available")
    c.add_argument("--dtype", default="float32", help="dtype the model is loaded and run in")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    c.set_defaults(fn=_cmd_calibrate)

    e = kvsub.add_parser(
        "eval",
        formatter_class=D,
        help="measure a preset: perplexity change, KL, cache bytes",
        description="Run the eval text through MODEL with the preset's compressed cache and report "
        "the perplexity change and KL against the uncompressed model and the cache "
        "bytes measured from the cache tensors. The preset is checked against the "
        "model (layers, KV heads, head_dim) before anything runs.",
    )
    e.add_argument("--input", required=True, help="builtin:NAME or a local Hugging Face model folder")
    e.add_argument("--preset", required=True, help="preset JSON written by `calibra kv calibrate`")
    e.add_argument("--rank", type=int, default=None, help="override the preset's ranks with R everywhere")
    e.add_argument(
        "--dataset",
        default="builtin",
        help="eval text: builtin (= builtin:eval, held-out), builtin:eval-prose, a .jsonl/.txt file or folder",
    )
    e.add_argument("--seq-len", type=int, default=None, help="window (default: a built-in model's trained length)")
    e.add_argument("--max-tokens", type=int, default=None, help="evaluate the first N tokens (default all)")
    e.add_argument("--device", default=None, help="compute device (default cuda if available)")
    e.add_argument("--dtype", default="float32", help="dtype the model is loaded and run in")
    e.add_argument("--no-progress", action="store_true", help="no progress bars")
    e.set_defaults(fn=_cmd_eval)
