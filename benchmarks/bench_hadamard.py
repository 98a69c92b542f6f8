"""Benchmark calibra.ops.hadamard: native vs the pure-torch reference vs a dense Hadamard matmul,
with torch.clone as the memory-bound roofline, all measured in one run.

    python benchmarks/bench_hadamard.py [--device cuda] [--quick]
"""

import math

import torch
from _common import clone_seconds, machine_line, median_seconds, nbytes, parser, print_table

import calibra
from calibra.ops import _ref


def sylvester(n: int, dtype, device) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=dtype, device=device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def main() -> None:
    args = parser(__doc__).parse_args()
    dev = args.device
    print(machine_line(dev))
    cases = [(512, 4096, None), (512, 4096, 128), (512, 8192, None), (128, 14336, 64)]
    if args.quick:
        cases = [(64, 1024, None)]
    rows = []
    for rows_n, n, block in cases:
        x = torch.randn(rows_n, n, device=dev)
        b = n if block is None else block
        t_native = median_seconds(lambda: calibra.ops.hadamard(x, block), dev, repeat=args.repeat)
        t_ref = median_seconds(lambda: _ref.hadamard(x, -1 if block is None else block), dev, repeat=args.repeat)
        hd = sylvester(b, x.dtype, dev)
        dense = (lambda: x @ hd) if b == n else (lambda: (x.view(rows_n, n // b, b) @ hd).view(rows_n, n))
        t_dense = median_seconds(dense, dev, repeat=args.repeat)
        t_clone = clone_seconds(x, repeat=args.repeat)
        gbs = 2 * nbytes(x) / t_native / 1e9
        rows.append([f"{rows_n}x{n}", b, t_native * 1e6, gbs, t_ref / t_native, t_dense / t_native, t_native / t_clone])
    print_table("hadamard (fp32)", ["x", "block", "native µs", "GB/s", "× ref", "× dense matmul", "time / clone"], rows)


if __name__ == "__main__":
    main()
