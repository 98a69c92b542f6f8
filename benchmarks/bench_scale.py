#!/usr/bin/env python
"""calibra quantize at realistic scale on this machine: wall time per stage, peak RSS, the planner's
prediction, bytes read from disk.

    PYTHONPATH=python python benchmarks/bench_scale.py --shape 8b --methods rtn,gptq
    PYTHONPATH=python python benchmarks/bench_scale.py --shape 8b --layers 4 --methods gptq   # quick check
    PYTHONPATH=python python benchmarks/bench_scale.py --shape 1b --methods gptq --json out.json

The checkpoints are random bf16 weights with real configs (Llama-3-8B, TinyLlama-1.1B), written once into
``$CALIBRA_BENCH_CACHE`` (default ``~/.cache/calibra-bench``, never in the repository) by
``_scale_checkpoint.py``. ``--layers K`` runs on the first K decoder layers: a folder beside the full one
with ``num_hidden_layers = K`` and those layers' tensors (copied once, cached too).

Each method runs ``python -m calibra quantize`` as a child process (GPTQ: W4 g128, ``--samples`` x
``--seq-len`` calibration tokens, default 8 x 512; RTN: W4 g128), exported as compressed-tensors, with
``--no-eval``. Reported per run: wall time, the stages from report.json (calibration, solve, writing the
rest), the child's peak RSS (``ru_maxrss`` from ``wait4``: its VmHWM), the planner's predicted peak, and
the bytes the job read from the weight files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _scale_checkpoint import cache_dir, ensure  # noqa: E402

GIB = 2**30


def limited(folder: Path, k: int) -> Path:
    """A copy of ``folder`` with only its first ``k`` decoder layers (the same tensors, new shards)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    cfg = json.loads((folder / "config.json").read_text())
    if k >= cfg["num_hidden_layers"]:
        return folder
    out = folder.with_name(f"{folder.name}-layers{k}")
    if (out / "config.json").exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    index = json.loads((folder / "model.safetensors.index.json").read_text())

    def keep(name: str) -> bool:
        parts = name.split(".")
        return not (len(parts) > 2 and parts[1] == "layers" and int(parts[2]) >= k)

    wm = {}
    for src in sorted(set(index["weight_map"].values())):
        names = [n for n, f in index["weight_map"].items() if f == src and keep(n)]
        if not names:
            continue
        with safe_open(str(folder / src), "pt") as f:
            part = {n: f.get_tensor(n) for n in names}
        save_file(part, str(tmp / src), metadata={"format": "pt"})
        wm.update(dict.fromkeys(names, src))
        del part
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}, indent=2))
    cfg["num_hidden_layers"] = k
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (folder / f).exists():
            shutil.copy(folder / f, tmp / f)
    os.rename(tmp, out)
    return out


def run_quantize(folder: Path, method: str, out: Path, args) -> dict:
    cmd = [sys.executable, "-m", "calibra", "quantize", "--input", str(folder), "--output", str(out)]
    cmd += ["--method", method, "--bits", "4", "--group-size", "128", "--no-eval", "--no-progress"]
    cmd += ["--export", "compressed-tensors", "--overwrite"]
    if method != "rtn":
        cmd += ["--samples", str(args.samples), "--seq-len", str(args.seq_len)]
    if args.stream is not None:
        cmd += ["--stream" if args.stream else "--no-stream"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        print(log)
        raise SystemExit(f"calibra quantize failed with exit code {code}")
    rep = json.loads((out / "report.json").read_text())
    t = rep["timings"]
    return {
        "method": method,
        "wall_s": wall,
        "job_s": t["total"],
        "calibration_s": t.get("calibration"),
        "solve_s": t.get("solve"),
        "write_rest_s": t.get("write_rest"),
        "peak_rss": usage.ru_maxrss * 1024,
        "predicted_peak": rep["plan"]["peak_host"],
        "placement": rep["plan"]["placement"],
        "bytes_read": rep.get("streaming", {}).get("bytes_read"),
        "rss_after_layer": rep.get("streaming", {}).get("rss_after_layer"),
        "output_bytes": sum(p.stat().st_size for p in out.iterdir() if p.is_file()),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["8b", "1b"], default="8b")
    ap.add_argument("--layers", type=int, default=None, help="only the first K decoder layers")
    ap.add_argument("--methods", default="rtn,gptq")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--out", default=None, help="output folder (default: a temporary one, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the outputs")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    folder = ensure(args.shape, echo=print)
    if args.layers:
        folder = limited(folder, args.layers)
    base = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="calibra-scale-", dir=cache_dir()))
    rows = []
    for method in args.methods.split(","):
        out = base / method
        print(f"{args.shape} ({folder.name}) {method} ...", flush=True)
        r = run_quantize(folder, method, out, args)
        rows.append(r)
        print(
            f"  wall {r['wall_s']:.0f} s (job {r['job_s']:.0f}: calibration {r['calibration_s'] or 0:.0f}, "
            f"solve {r['solve_s'] or 0:.0f}, write rest {r['write_rest_s'] or 0:.0f}); peak RSS "
            f"{r['peak_rss'] / GIB:.2f} GiB, predicted {r['predicted_peak'] / GIB:.2f} GiB "
            f"({r['peak_rss'] / r['predicted_peak']:.2f}x); read {(r['bytes_read'] or 0) / 1e9:.1f} GB; "
            f"output {r['output_bytes'] / 1e9:.2f} GB",
            flush=True,
        )
        if not args.keep and args.out is None:
            shutil.rmtree(out, ignore_errors=True)
    print()
    print("| model | layers | method | wall s | peak RSS GiB | predicted GiB | ratio | read GB |")
    print("|---|---|---|---|---|---|---|---|")
    n = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    for r in rows:
        print(
            f"| {args.shape} | {n} | {r['method']} | {r['wall_s']:.0f} | {r['peak_rss'] / GIB:.2f} | "
            f"{r['predicted_peak'] / GIB:.2f} | {r['peak_rss'] / r['predicted_peak']:.2f} | "
            f"{(r['bytes_read'] or 0) / 1e9:.1f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": args.shape, "layers": n, "rows": rows}, indent=1))
    if args.out is None and not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
