"""Benchmark calibra.ops.pack: native vs the pure-torch reference, with torch.clone of the codes as
the memory-bound roofline, all measured in one run.

    python benchmarks/bench_pack.py [--device cuda] [--quick]
"""

import torch
from _common import clone_seconds, machine_line, median_seconds, nbytes, parser, print_table

import calibra
from calibra.ops import _ref


def main() -> None:
    args = parser(__doc__).parse_args()
    dev = args.device
    print(machine_line(dev))
    n = 512 if args.quick else 4096
    codes = torch.randint(0, 16, (n, n), dtype=torch.uint8, device=dev)
    cases = [
        ("4-bit, dim 1, int32 (CT / MLX)", codes, 1, torch.int32),
        ("4-bit, codes.T dim 0, int32 (GPTQ qweight)", codes.t(), 0, torch.int32),
        ("4-bit, dim 1, uint8 (FP4)", codes, 1, torch.uint8),
    ]
    rows = []
    t_clone = clone_seconds(codes, repeat=args.repeat)
    for name, x, dim, word in cases:
        t_native = median_seconds(lambda: calibra.ops.pack(x, 4, dim=dim, word=word), dev, repeat=args.repeat)
        t_ref = median_seconds(lambda: _ref.pack(x, 4, dim, word), dev, warmup=1, repeat=max(1, args.repeat // 3))
        out = calibra.ops.pack(x, 4, dim=dim, word=word)
        gbs = (nbytes(x) + nbytes(out)) / t_native / 1e9
        rows.append([name, f"{n}x{n}", t_native * 1e6, gbs, t_ref / t_native, t_native / t_clone])
    print_table("pack (uint8 codes)", ["case", "codes", "native µs", "GB/s", "× ref", "time / clone"], rows)
    print(f"clone of the codes: {t_clone * 1e6:.0f} µs")


if __name__ == "__main__":
    main()
