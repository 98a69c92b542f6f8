#!/usr/bin/env python
"""calibra quantize on 1, 2 and 4 processes (``torchrun --nproc-per-node N``, gloo on the CPU): wall time,
each rank's time and peak RSS, and whether the output equals the one-process run's byte for byte.

    PYTHONPATH=python python benchmarks/bench_distributed.py                       # 1B-shaped, GPTQ
    PYTHONPATH=python python benchmarks/bench_distributed.py --layers 2 --ranks 1,2  # quick check

The checkpoint is the scale benchmark's 1B-shaped one (TinyLlama-1.1B's config, random bf16 weights,
written once into ``$CALIBRA_BENCH_CACHE`` by ``_scale_checkpoint.py``; ``--layers K``: its first K decoder
layers). Every run: GPTQ W4 g128, ``--samples`` x ``--seq-len`` calibration tokens, float64 Hessian sums
(what a distributed job always uses, so the runs are comparable and the outputs equal), no evaluation,
calibra's own output format. The threads per process are the machine's cores divided by the number of
processes (``OMP_NUM_THREADS`` and torch's intra-op threads), so every run uses the same cores: on a CPU
host the ranks share one machine's arithmetic, and what the benchmark shows is the cost of the split
(collectives, each rank's own forward passes, the solves spread over the ranks), not a GPU node's
speedup, where each rank has a device of its own.

The outputs are byte-identical when every rank computes the same float32 forward values as one process;
a different thread count per process (or another batch composition) changes the last bits of the float32
matmuls, and GPTQ on a Hessian of fewer tokens than columns turns last bits into other codes: one process
alone, 1 vs 2 threads, differs the same way (docs/distributed.md has the measurement).
"""

from __future__ import annotations

import argparse
import hashlib
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
from bench_scale import limited  # noqa: E402

GIB = 2**30


def run(folder: Path, ranks: int, out: Path, args) -> dict:
    """One ``calibra quantize`` on ``ranks`` processes; its wall time and the report's per-rank figures."""
    threads = args.threads or max(1, (os.cpu_count() or 1) // ranks)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))  # torch's intra-op threads follow it
    env.pop("WORLD_SIZE", None)
    job = ["quantize", "--input", str(folder), "--output", str(out), "--method", "gptq", "--bits", "4"]
    job += ["--group-size", "128", "--samples", str(args.samples), "--seq-len", str(args.seq_len)]
    job += ["--hessian-dtype", "float64", "--no-eval", "--no-progress", "--overwrite"]
    if ranks == 1:
        cmd = [sys.executable, "-m", "calibra", *job]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
        cmd += ["-m", "calibra", *job]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        print(log[-6000:])
        raise SystemExit(f"calibra quantize on {ranks} process(es) failed with exit code {code}")
    rep = json.loads((out / "report.json").read_text())
    dist = rep["settings"].get("distributed")
    # each rank's VmHWM from the report; one process: the child's (wait4's ru_maxrss)
    per_rank = dist["per_rank"] if dist else [{"seconds": rep["timings"]["total"], "peak_rss": usage.ru_maxrss * 1024}]
    return {
        "ranks": ranks,
        "threads_per_rank": threads,
        "wall_s": wall,
        "job_s": rep["timings"]["total"],
        "solve_s": rep["timings"].get("solve"),
        "per_rank": per_rank,
        "solves_per_rank": dist["solves_per_rank"] if dist else None,
        "predicted_peak_per_rank": rep["plan"]["peak_host"],
        "sha256": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.glob("*.safetensors"))},
    }


def codes_differing(a: Path, b: Path) -> float:
    """The share of quantization codes that differ between two outputs (0.0: identical codes)."""
    from safetensors.torch import load_file

    differ = total = 0
    for fa in sorted(a.glob("*.safetensors")):
        ta, tb = load_file(fa), load_file(b / fa.name)
        for name in (n for n in ta if n.endswith(".codes")):
            differ += int((ta[name] != tb[name]).sum())
            total += ta[name].numel()
    return differ / max(total, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["1b", "8b"], default="1b")
    ap.add_argument("--layers", type=int, default=None, help="only the first K decoder layers")
    ap.add_argument("--ranks", default="1,2,4", help="process counts to run, comma-separated (first: the baseline)")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads per process for every run (default: cores / processes); --threads 1 makes every process "
        "compute the same float32 values, so the outputs can be compared byte for byte",
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    folder = ensure(args.shape, echo=print)
    if args.layers:
        folder = limited(folder, args.layers)
    base = Path(tempfile.mkdtemp(prefix="calibra-dist-", dir=cache_dir()))
    rows = []
    try:
        counts = [int(x) for x in args.ranks.split(",")]
        for n in counts:
            print(f"{folder.name}: GPTQ on {n} process(es) ...", flush=True)
            rows.append(run(folder, n, base / f"ranks{n}", args))
            rows[-1]["codes_differing"] = codes_differing(base / f"ranks{counts[0]}", base / f"ranks{n}")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    first = rows[0]
    print()
    print(f"cores: {os.cpu_count()}; {args.samples} x {args.seq_len} calibration tokens; checkpoint {folder.name}")
    head = "processes | threads each | wall s | vs first | job s | peak RSS per rank GiB | predicted GiB | solves"
    print(f"| {head} | output vs first |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rss = ", ".join(f"{(p['peak_rss'] or 0) / GIB:.2f}" for p in r["per_rank"])
        same = "identical" if r["sha256"] == first["sha256"] else f"{r['codes_differing']:.2%} of codes differ"
        print(
            f"| {r['ranks']} | {r['threads_per_rank']} | {r['wall_s']:.1f} | {r['wall_s'] / first['wall_s']:.2f}x | "
            f"{r['job_s']:.1f} | {rss} | {r['predicted_peak_per_rank'] / GIB:.2f} | "
            f"{r['solves_per_rank'] or '-'} | {same} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"folder": folder.name, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
