"""``calibra report PATH``: (re)write the HTML report of a finished job from the files it left."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

_WHAT = (
    "PATH is a quantize or prune output folder (its report.json), a statistics file from `calibra calibrate` "
    "(.safetensors) or a preset from `calibra kv calibrate` (.json)"
)


def _load_json(path: Path, what: str) -> dict:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"[report] no {what} at {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"[report] {path} is not a readable JSON file ({what}): {e}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"[report] {path} holds no JSON object ({what})")
    return doc


def _preset_values(path: Path, doc: dict) -> dict | None:
    """The bases' eigenvalues from the preset's tensor file (absent or unreadable: the page goes without
    the variance curves)."""
    from safetensors import safe_open

    tensors = path.with_name(str(doc.get("tensors") or path.with_suffix(".safetensors").name))
    if not tensors.is_file():
        return None
    out: dict = {}
    with safe_open(str(tensors), framework="pt") as f:
        for w in doc.get("ranks") or {}:
            out[w] = [f.get_tensor(f"{w}.values.{i}") for i in range(int(doc.get("num_layers") or 0))]
    return out


def _cmd_report(args: argparse.Namespace) -> int:
    from calibra import report as rp

    path = Path(args.path).expanduser()
    attribution = _load_json(Path(args.attribution), "attribution results") if args.attribution else None
    if attribution is not None and not (attribution.get("attribution") or attribution.get("layers")):
        raise ValueError(
            f"[report] {args.attribution} has no per-layer attribution; write one with "
            "`calibra eval --model OUT --reference MODEL --metric kl-divergence --attribution --json FILE`"
        )
    stats = None
    if args.stats:
        from calibra.calib.stats import CalibrationStats

        try:
            stats = CalibrationStats.load(args.stats)
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"[report] {e}") from None
    if path.is_dir() or path.name == "report.json":
        folder = path if path.is_dir() else path.parent
        if not (folder / "report.json").is_file():
            raise ValueError(
                f"[report] no report.json in {folder}; {_WHAT}. quantize and prune write report.json "
                "into their output folder"
            )
        report = _load_json(folder / "report.json", "report.json")
        if not str(report.get("format", "")).startswith("calibra-"):
            raise ValueError(f"[report] {folder / 'report.json'} is not a calibra job report")
        text = rp.render_report(report, attribution=attribution, stats=stats)
        target = Path(args.output) if args.output else folder / rp.HTML_NAME
    elif path.suffix == ".safetensors":
        from calibra.calib.stats import CalibrationStats

        try:
            text = rp.render_stats(stats if stats is not None else CalibrationStats.load(path))
        except (FileNotFoundError, ValueError) as e:
            raise ValueError(f"[report] {e}") from None
        target = Path(args.output) if args.output else rp.html_beside(path)
    elif path.suffix == ".json":
        doc = _load_json(path, "KV preset")
        if doc.get("format") != "calibra-kv-preset":
            raise ValueError(f"[report] {path} is not a KV preset (format {doc.get('format')!r}); {_WHAT}")
        text = rp.render_preset(doc, _preset_values(path, doc))
        target = Path(args.output) if args.output else rp.html_beside(path)
    else:
        raise ValueError(f"[report] {path} does not exist or is not a report; {_WHAT}")
    rp.write_html(target, text)
    print(f"calibra report: wrote {target} ({len(text.encode()) / 1024:.0f} KiB)")
    return 0


def add_parser(sub) -> None:
    r = sub.add_parser(
        "report",
        help="write report.html (the plots that find the problem layer) from a job's report.json",
        description="Write one self-contained HTML page (inline SVG plots, no script, no network) from a "
        "finished job: the summary, per-module reconstruction loss with the worst modules named and the "
        "damping ladder's interventions, KL attribution by layer, achieved sparsity, the MoE tokens-per-expert "
        "heatmap, KV quality vs rank, and planned vs measured memory. quantize, prune, calibrate and kv "
        f"calibrate write it themselves; this command rewrites it, e.g. with attribution results. {_WHAT}.",
        epilog="examples:\n"
        "  calibra report out/                                  # rewrite out/report.html\n"
        "  calibra eval --model out --reference builtin:tiny-moe --metric kl-divergence --attribution \\\n"
        "      --json out/attribution.json && calibra report out/ --attribution out/attribution.json\n"
        "  calibra report stats.safetensors                     # -> stats.report.html\n"
        "  calibra report kv_preset.json                        # -> kv_preset.report.html",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    r.add_argument("path", metavar="PATH", help="output folder with report.json, stats .safetensors or KV preset .json")
    r.add_argument(
        "--attribution",
        default=None,
        metavar="JSON",
        help="`calibra eval --attribution --json` results: adds the KL-by-layer section",
    )
    r.add_argument(
        "--stats",
        default=None,
        metavar="FILE",
        help="statistics file (calibra calibrate): its MoE coverage when the report has none (a --stats job)",
    )
    r.add_argument("--output", default=None, metavar="HTML", help="where to write (default: DIR/report.html)")
    r.set_defaults(fn=_cmd_report)
