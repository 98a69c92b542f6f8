"""Benchmark calibra.ops.hessian_accumulate (H += X^T X) against torch's own ``x.T @ x`` (MKL on CPU:
the roofline baseline here) and the pure-torch fp64 reference, all measured in one run.

GFLOP/s counts the full 2*N*d^2 flops of X^T X for every row (as a GEMM would), although the native
kernel computes only the lower triangle (about half of them), so the figures compare directly.

    python benchmarks/bench_hessian.py [--device cuda] [--quick] [--repeat N]
"""
import torch

import calibra
from calibra.ops import _ref
from _common import machine_line, median_seconds, parser, print_table


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
        t_torch = median_seconds(lambda: x.T @ x, dev, repeat=args.repeat)
        H32 = torch.zeros(d, d, device=dev)
        t_ref = median_seconds(lambda: _ref.hessian_accumulate(H32, x), dev, warmup=1, repeat=max(1, args.repeat // 2))
        for hdtype in (torch.float32, torch.float64):
            H = torch.zeros(d, d, dtype=hdtype, device=dev)
            t = median_seconds(lambda: calibra.ops.hessian_accumulate(H, x), dev, repeat=args.repeat)
            rows.append([f"{n}x{d}", str(hdtype).replace("torch.", ""), t * 1e3, flops / t / 1e9,
                         t_torch * 1e3, t_torch / t, t_ref / t])
    print_table("hessian_accumulate (fp32 x)",
                ["x", "H", "native ms", "GFLOP/s (2·N·d²)", "torch x.T@x ms", "× torch x.T@x", "× ref (fp64)"], rows)


if __name__ == "__main__":
    main()
