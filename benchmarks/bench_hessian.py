"""Benchmark calibra.ops.hessian_accumulate (H += X^T X) against torch's own ``x.T @ x`` (MKL on CPU:
the roofline baseline here) and the pure-torch fp64 reference, all measured in one run.

Native and torch are timed in alternation (one run of each per round, medians over the rounds), so a
load change on a shared machine hits both alike. GFLOP/s counts the full 2*N*d^2 flops of X^T X for
every row (as a GEMM would), although the native kernel computes only the lower triangle (about half
of them), so the figures compare directly.

    python benchmarks/bench_hessian.py [--device cuda] [--quick] [--repeat N]
"""

import statistics
import time

import torch
from _common import machine_line, median_seconds, parser, print_table, sync

import calibra
from calibra.ops import _ref


def paired_medians(fns, device: str, repeat: int) -> list[float]:
    """Median seconds of each fn, timed in alternation: round r runs fns[0], fns[1], ... once each."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def main() -> None:
    args = parser(__doc__).parse_args()
    dev = args.device
    print(machine_line(dev))
    cases = [(2048, 4096), (2048, 1024), (512, 4096)]
    if args.quick:
        cases = [(256, 512)]
    rows = []
    for n, d in cases:
        x = torch.randn(n, d, device=dev)
        flops = 2.0 * n * d * d
        H32 = torch.zeros(d, d, device=dev)
        H64 = torch.zeros(d, d, dtype=torch.float64, device=dev)
        t_torch, t32, t64 = paired_medians(
            [
                lambda: x.T @ x,
                lambda: calibra.ops.hessian_accumulate(H32, x),
                lambda: calibra.ops.hessian_accumulate(H64, x),
            ],
            dev,
            args.repeat,
        )
        t_ref = median_seconds(lambda: _ref.hessian_accumulate(H32, x), dev, warmup=1, repeat=max(1, args.repeat // 2))
        for hdtype, t in ((torch.float32, t32), (torch.float64, t64)):
            rows.append(
                [
                    f"{n}x{d}",
                    str(hdtype).replace("torch.", ""),
                    t * 1e3,
                    flops / t / 1e9,
                    t_torch * 1e3,
                    t_torch / t,
                    t_ref / t,
                ]
            )
    print_table(
        "hessian_accumulate (fp32 x)",
        ["x", "H", "native ms", "GFLOP/s (2·N·d²)", "torch x.T@x ms", "× torch x.T@x", "× ref (fp64)"],
        rows,
    )

    # bf16 activations into a float32 H: the tensor-core kernel on CUDA. Baseline: torch's fp32 product of
    # the upcast x (the same exact products; a bf16 matmul would round H to bf16) and, on CUDA, torch's
    # bf16 matmul as the tensor-core roofline (same flops, 16-bit output).
    rows = []
    for n, d in cases:
        xb = torch.randn(n, d, device=dev).to(torch.bfloat16)
        flops = 2.0 * n * d * d
        H32 = torch.zeros(d, d, device=dev)
        fns = [lambda: calibra.ops.hessian_accumulate(H32, xb), lambda: xb.float().T @ xb.float(), lambda: xb.T @ xb]
        t_nat, t_up, t_bf = paired_medians(fns, dev, args.repeat)
        rows.append([f"{n}x{d}", t_nat * 1e3, flops / t_nat / 1e9, t_up * 1e3, t_up / t_nat, t_bf * 1e3, t_bf / t_nat])
    print_table(
        "hessian_accumulate (bf16 x, float32 H)",
        [
            "x",
            "native ms",
            "GFLOP/s (2·N·d²)",
            "torch fp32 (upcast) ms",
            "× upcast",
            "torch bf16 x.T@x ms",
            "× bf16 matmul",
        ],
        rows,
    )


if __name__ == "__main__":
    main()
