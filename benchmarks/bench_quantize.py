"""Benchmark the quantize family: native quantize vs the pure-torch reference, with torch.clone as the
memory-bound roofline, all measured in one run. Bytes moved = bytes(w) + bytes(codes) + bytes(scales)
(+ zeros); "% clone BW" compares that rate with clone's 2 * bytes(w) / time.

    python benchmarks/bench_quantize.py [--device cuda|mps] [--quick] [--repeat N]
"""

import torch
from _common import clone_seconds, machine_line, median_seconds, nbytes, parser, print_table

import calibra
from calibra.ops import _ref

CASES = [  # (label, kind, args)
    ("int4 g128 sym", "int", (4, 128, True)),
    ("int4 g128 asym", "int", (4, 128, False)),
    ("int8 per-channel", "int", (8, -1, True)),
    ("mxfp4", "fp4", ("mxfp4",)),
    ("nvfp4", "fp4", ("nvfp4",)),
]


def ref_ratio(ref, t_native: float, dev: str, repeat: int):
    """× ref: the reference's time over the native one; "n/a" where the reference cannot run on ``dev`` (on
    MPS some torch ops of the references, e.g. float8 casts, may be missing)."""
    try:
        return median_seconds(ref, dev, warmup=1, repeat=max(3, repeat // 2)) / t_native
    except (RuntimeError, TypeError, NotImplementedError) as e:
        print(f"(the reference does not run on {dev}: {str(e).splitlines()[0][:120]})")
        return "n/a"


def main() -> None:
    args = parser(__doc__).parse_args()
    dev = args.device
    print(machine_line(dev))
    shapes = [(4096, 4096)] if args.quick else [(4096, 4096), (14336, 4096)]
    has_pack = hasattr(calibra.ops, "pack")
    rows = []
    for shape in shapes:
        torch.manual_seed(0)
        w = torch.randn(shape, device=dev)
        t_clone = clone_seconds(w, repeat=args.repeat)
        clone_bw = 2 * nbytes(w) / t_clone
        for label, kind, a in CASES:
            if kind == "int":
                native = lambda: torch.ops.calibra.quantize_int(w, *a)  # noqa: E731
                ref = lambda: _ref.quantize_int(w, *a)  # noqa: E731
            else:
                native = lambda: torch.ops.calibra.quantize_fp4(w, *a)  # noqa: E731
                ref = lambda: _ref.quantize_fp4(w, *a)  # noqa: E731
            outs = native()
            moved = nbytes(w, *outs)
            t_native = median_seconds(native, dev, repeat=args.repeat)
            x_ref = ref_ratio(ref, t_native, dev, args.repeat)
            bw = moved / t_native
            rows.append(
                [
                    label,
                    f"{shape[0]}x{shape[1]}",
                    t_native * 1e6,
                    bw / 1e9,
                    x_ref,
                    100 * bw / clone_bw,
                    t_native / t_clone,
                ]
            )
        if has_pack:

            def qpack():
                codes, scales, zeros = torch.ops.calibra.quantize_int(w, 4, 128, True)
                return calibra.ops.pack(codes, 4, dim=-1, word=torch.int32), scales, zeros

            def qpack_ref():
                codes, scales, zeros = _ref.quantize_int(w, 4, 128, True)
                return _ref.pack(codes, 4, 1, torch.int32), scales, zeros

            outs = qpack()
            moved = nbytes(w, *outs)
            t_native = median_seconds(qpack, dev, repeat=args.repeat)
            x_ref = ref_ratio(qpack_ref, t_native, dev, args.repeat)
            bw = moved / t_native
            rows.append(
                [
                    "int4 g128 sym + pack",
                    f"{shape[0]}x{shape[1]}",
                    t_native * 1e6,
                    bw / 1e9,
                    x_ref,
                    100 * bw / clone_bw,
                    t_native / t_clone,
                ]
            )
    print_table(
        f"quantize (fp32 weights, {dev})",
        ["case", "w", "native µs", "GB/s", "× ref", "% clone BW", "time / clone"],
        rows,
    )
    if not has_pack:
        print("\n(calibra.ops.pack not available: the quantize+pack row is skipped)")


if __name__ == "__main__":
    main()
