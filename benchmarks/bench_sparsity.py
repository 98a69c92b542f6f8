"""Benchmark calibra.ops.nm_mask / compress_24 / decompress_24: native vs the pure-torch reference,
with torch.clone of the input as the memory-bound roofline, all measured in one run.

    python benchmarks/bench_sparsity.py [--device cuda] [--quick]
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
    rep = args.repeat
    slow = max(1, rep // 3)
    rows = []
    scores = torch.randn(n, n, device=dev)
    t_clone = clone_seconds(scores, repeat=rep)
    for nn, m in ((2, 4), (4, 8)):
        t_native = median_seconds(lambda: calibra.ops.nm_mask(scores, nn, m), dev, repeat=rep)
        t_ref = median_seconds(lambda: _ref.nm_mask(scores, nn, m), dev, warmup=1, repeat=slow)
        gbs = (nbytes(scores) + scores.numel()) / t_native / 1e9
        rows.append([f"nm_mask {nn}:{m}", f"{n}x{n} fp32", t_native * 1e6, gbs, t_ref / t_native, t_native / t_clone])
    w = calibra.ops.nm_mask(scores, 2, 4).to(torch.float16) * scores.to(torch.float16)
    t_clone16 = clone_seconds(w, repeat=rep)
    values, meta = calibra.ops.compress_24(w)
    t_native = median_seconds(lambda: calibra.ops.compress_24(w), dev, repeat=rep)
    t_ref = median_seconds(lambda: _ref.compress_24(w), dev, warmup=1, repeat=slow)
    gbs = (nbytes(w) + nbytes(values, meta)) / t_native / 1e9
    rows.append(["compress_24", f"{n}x{n} fp16", t_native * 1e6, gbs, t_ref / t_native, t_native / t_clone16])
    t_native = median_seconds(lambda: calibra.ops.decompress_24(values, meta), dev, repeat=rep)
    t_ref = median_seconds(lambda: _ref.decompress_24(values, meta), dev, warmup=1, repeat=slow)
    gbs = (nbytes(w) + nbytes(values, meta)) / t_native / 1e9
    rows.append(["decompress_24", f"{n}x{n} fp16", t_native * 1e6, gbs, t_ref / t_native, t_native / t_clone16])
    print_table("N:M sparsity", ["op", "input", "native µs", "GB/s", "× ref", "time / clone"], rows)


if __name__ == "__main__":
    main()
