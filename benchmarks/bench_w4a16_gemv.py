"""Benchmark calibra.ops.w4a16_gemm at decode batch 1 (the GEMV) against the memory bandwidth, on Apple
Silicon (``--device mps``: the Metal kernel cal_w4a16_gemv) or any device calibra serves.

At batch 1 the GEMV is memory-bound: its floor is the time to read the int4 weight (plus scales, x and y)
once. Reported per Llama-3-8B layer shape: µs (median), GB/s of the bytes the kernel must move, that rate as
a share of (a) the chip's nominal memory bandwidth (Apple's published figure for the chip ``sysctl``
names; ``--bandwidth`` overrides) and (b) ``torch.clone``'s measured rate on the same device (2 x bytes /
time), and the speed against torch's dense fp16 matmul of the same layer. Each shape is first checked
against the reference (calibra.ops._ref.gemm), and the trace must show the native kernel served the call,
so a broken or absent kernel cannot post a time.

    python benchmarks/bench_w4a16_gemv.py [--device mps] [--quick] [--repeat N] [--bandwidth GBPS] [--chip NAME]
"""

from __future__ import annotations

import platform
import subprocess
import sys

import torch
from _common import clone_seconds, machine_line, median_seconds, nbytes, parser, print_table

import calibra
from calibra.ops._ref import gemm as R

SHAPES = [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096)]  # (K, N)
QUICK = [("quick", 512, 256)]

# Apple's published unified-memory bandwidth, GB/s. Where one chip name covers two bandwidths (binned
# M3 Max / M4 Max) the higher is listed and the report says "up to".
APPLE_BANDWIDTH = {
    "M1": 68.25,
    "M1 Pro": 200,
    "M1 Max": 400,
    "M1 Ultra": 800,
    "M2": 100,
    "M2 Pro": 200,
    "M2 Max": 400,
    "M2 Ultra": 800,
    "M3": 100,
    "M3 Pro": 150,
    "M3 Max": 400,
    "M3 Ultra": 819,
    "M4": 120,
    "M4 Pro": 273,
    "M4 Max": 546,
}
BINNED = {"M3 Max", "M4 Max"}


def chip_name() -> str:
    """``Apple M2 Max`` on a Mac (sysctl), else the platform's processor name."""
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip()
        except OSError:
            pass
    return platform.processor() or platform.machine()


def nominal_bandwidth(chip: str) -> tuple[float | None, str]:
    """(GB/s, how it was found) for a chip name such as ``Apple M2 Max``; (None, why) when unknown."""
    name = chip.removeprefix("Apple ").strip()
    if name in APPLE_BANDWIDTH:
        note = "up to " if name in BINNED else ""
        return float(APPLE_BANDWIDTH[name]), f"{note}{APPLE_BANDWIDTH[name]} GB/s, Apple's figure for {name}"
    return None, f"no nominal bandwidth known for {chip!r} (pass --bandwidth GBPS)"


def operands(k: int, n: int, device: str, group: int = 128):
    g = torch.Generator().manual_seed(k + n)
    codes = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    qweight = calibra.ops.pack(codes, 4)
    tiled = calibra.ops.w4a16_repack(qweight)
    scales = (torch.rand(k // group, n, generator=g) * 0.01 + 0.001).half()
    x = torch.randn(1, k, generator=g).half()
    return tuple(t.to(device) for t in (x, tiled, scales)), group


def main() -> int:
    p = parser(__doc__)
    p.add_argument("--bandwidth", type=float, default=None, help="the chip's memory bandwidth in GB/s (overrides)")
    p.add_argument("--chip", default=None, help="chip name for the bandwidth table (default: this machine's)")
    args = p.parse_args()
    dev = args.device
    print(machine_line(dev))
    chip = args.chip or chip_name()
    peak, how = (args.bandwidth, f"{args.bandwidth} GB/s (--bandwidth)") if args.bandwidth else nominal_bandwidth(chip)
    print(f"chip: {chip}; nominal bandwidth: {how}")
    rows, failed = [], False
    for label, k, n in QUICK if args.quick else SHAPES:
        (x, tiled, scales), group = operands(k, n, dev)
        with calibra.ops.trace() as t:
            y = calibra.ops.w4a16_gemm(x, tiled, scales, None, group)
        impl = ",".join(sorted(t.impls("w4a16_gemm")))
        want = R.w4a16_gemm(x.cpu(), tiled.cpu(), scales.cpu(), None, group)
        err = float((y.cpu().float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-12))
        native = impl == dev.split(":")[0]
        if not native or err > 1e-2:
            print(f"{label}: served by {impl!r} (expected the {dev} kernel), max rel. error {err:.2e}: not timed")
            failed = True
            continue
        moved = nbytes(x, tiled, scales, y)
        t_gemv = median_seconds(lambda: calibra.ops.w4a16_gemm(x, tiled, scales, None, group), dev, repeat=args.repeat)
        w16 = torch.randn(n, k, device=dev).half()
        t_dense = median_seconds(lambda: x @ w16.T, dev, repeat=args.repeat)
        clone_bw = 2 * nbytes(w16) / clone_seconds(w16, repeat=args.repeat)
        bw = moved / t_gemv
        rows.append(
            [
                label,
                f"{k}x{n}",
                impl,
                t_gemv * 1e6,
                bw / 1e9,
                100 * bw / (peak * 1e9) if peak else "n/a",
                100 * bw / clone_bw,
                t_dense / t_gemv,
                f"{err:.1e}",
            ]
        )
    header = ["layer", "KxN", "impl", "µs", "GB/s", "% nominal BW", "% clone BW", "vs fp16 matmul", "max rel err"]
    print_table(f"W4A16 GEMV (batch 1, int4 g128 sym, fp16) on {dev}", header, rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
