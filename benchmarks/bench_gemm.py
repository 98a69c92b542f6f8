"""Benchmark calibra's inference GEMMs on a CUDA GPU, all in one run:

- ``w4a16_gemm`` (int4 g128 symmetric weights x fp16 activations),
- ``sparse24_gemm`` (2:4-sparse fp16 weights on sparse tensor cores),
- torch's dense fp16 matmul (cuBLAS) -- the baseline every ratio is against,
- torch's ``to_sparse_semi_structured`` 2:4 matmul where it runs (cuSPARSELt / CUTLASS).

Shapes: Llama-3-8B and Llama-2-70B layers (../shared/TARGETS.md; K = in_features, N = out_features),
batch 1, 16, 32, 64, 128. Reported: µs (median of CUDA-event timings), TFLOP/s (2MNK, dense-equivalent),
GB/s (bytes the kernel must move: weights + scales/metadata + x + y), and speedups over cuBLAS fp16
(>1 = faster). Weight copies are rotated so that the working set exceeds the L2 cache. Each shape is also
checked against the dense result first (max error relative to max |y|), so a broken kernel cannot post a
fast time.

    python benchmarks/bench_gemm.py [--quick] [--repeat N] [--models llama3-8b,llama2-70b] [--batches 1,16]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

import calibra
from calibra.ops import gemm as G

SHAPES = {
    "llama3-8b": [("qkv", 4096, 6144), ("o", 4096, 4096), ("gate_up", 4096, 28672), ("down", 14336, 4096)],
    "llama2-70b": [("qkv", 8192, 10240), ("o", 8192, 8192), ("gate_up", 8192, 57344), ("down", 28672, 8192)],
}
BATCHES = (1, 16, 32, 64, 128)


def cuda_time_us(fns, repeat: int) -> float:
    """Median µs of calling fns[i % len(fns)] (rotating weight copies), timed with CUDA events."""
    for f in fns[:2]:
        f()
    torch.cuda.synchronize()
    times = []
    for i in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fns[i % len(fns)]()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def sparse_24(w: torch.Tensor) -> torch.Tensor:
    return w * calibra.ops.nm_mask(w.abs(), 2, 4)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="Llama-3-8B o_proj, batch 1 and 16 only")
    p.add_argument("--models", default="llama3-8b,llama2-70b")
    p.add_argument("--batches", default=",".join(map(str, BATCHES)))
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_gemm: no CUDA device here; this benchmark times CUDA kernels only (run it on an NVIDIA GPU).")
        return 2
    if not {"w4a16_gemm", "sparse24_gemm"} <= calibra.ops.native_ops("cuda"):
        print(f"bench_gemm: calibra's CUDA backend did not load: {calibra.build_info()['backends']['cuda']}")
        return 2
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    l2 = getattr(props, "L2_cache_size", 50 * 2**20)
    print(
        f"device: {props.name}, {props.multi_processor_count} SMs, L2 {l2 / 2**20:.0f} MiB | torch {torch.__version__}"
    )
    try:
        from torch.sparse import to_sparse_semi_structured
    except ImportError:  # pragma: no cover
        to_sparse_semi_structured = None

    cases = [(m, *s) for m in args.models.split(",") for s in SHAPES[m]]
    batches = [int(b) for b in args.batches.split(",")]
    if args.quick:
        cases, batches = [("llama3-8b", "o", 4096, 4096)], [1, 16]
    header = [
        "model",
        "layer",
        "K x N",
        "batch",
        "cuBLAS µs",
        "W4A16 µs",
        "W4A16 TFLOP/s",
        "W4A16 GB/s",
        "W4A16 / cuBLAS",
        "2:4 µs",
        "2:4 TFLOP/s",
        "2:4 GB/s",
        "2:4 / cuBLAS",
        "torch 2:4 µs",
        "torch 2:4 / cuBLAS",
        "err W4A16",
        "err 2:4",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" for _ in header) + "|")
    gen = torch.Generator(device=dev).manual_seed(0)
    for model, layer, k, n in cases:
        dense_bytes = n * k * 2
        copies = max(1, min(8, -(-2 * l2 // dense_bytes)))
        w = [(torch.randn(n, k, device=dev, generator=gen) * 0.02).half() for _ in range(copies)]
        qs = [calibra.ops.quantize(wi, bits=4, group_size=128, symmetric=True) for wi in w]
        w4 = [G.w4a16_prepare(calibra.ops.pack(q.codes, 4), q.scales, None, dtype=torch.float16) for q in qs]
        ws = [sparse_24(wi) for wi in w]
        sp = [G.sparse24_prepare(wi) for wi in ws]
        tss = None
        if to_sparse_semi_structured is not None:
            try:
                tss = [to_sparse_semi_structured(wi) for wi in ws]
            except Exception as e:  # noqa: BLE001 - report and go on without it
                print(f"<!-- to_sparse_semi_structured unavailable for {k}x{n}: {type(e).__name__}: {e} -->")
        w4_bytes = n * k // 2 + w4[0][1].numel() * 2
        sp_bytes = n * k + sp[0][1].numel() * 4
        for m in batches:
            x = torch.randn(m, k, device=dev, generator=gen).half()
            y_bytes = 2 * m * (k + n)
            ref4 = x @ calibra.ops.dequantize(qs[0]).T
            err4 = rel_err(calibra.ops.w4a16_gemm(x, w4[0][0], w4[0][1], None, 128), ref4)
            err24 = rel_err(calibra.ops.sparse24_gemm(x, *sp[0]), x @ ws[0].T)
            t_dense = cuda_time_us([lambda wi=wi: x @ wi.T for wi in w], args.repeat)
            t4 = cuda_time_us([lambda o=o: calibra.ops.w4a16_gemm(x, o[0], o[1], None, 128) for o in w4], args.repeat)
            t24 = cuda_time_us([lambda o=o: calibra.ops.sparse24_gemm(x, *o) for o in sp], args.repeat)
            t_tss = "n/a"
            if tss is not None:
                try:
                    t_tss = cuda_time_us([lambda o=o: torch.mm(o, x.T) for o in tss], args.repeat)
                except Exception as e:  # noqa: BLE001
                    t_tss = f"n/a ({type(e).__name__})"
            flop = 2 * m * n * k
            row = [
                model,
                layer,
                f"{k}x{n}",
                m,
                f"{t_dense:.1f}",
                f"{t4:.1f}",
                f"{flop / t4 / 1e6:.1f}",
                f"{(w4_bytes + y_bytes) / t4 / 1e3:.0f}",
                f"{t_dense / t4:.2f}",
                f"{t24:.1f}",
                f"{flop / t24 / 1e6:.1f}",
                f"{(sp_bytes + y_bytes) / t24 / 1e3:.0f}",
                f"{t_dense / t24:.2f}",
                f"{t_tss:.1f}" if isinstance(t_tss, float) else t_tss,
                f"{t_dense / t_tss:.2f}" if isinstance(t_tss, float) else "n/a",
                f"{err4:.1e}",
                f"{err24:.1e}",
            ]
            print("| " + " | ".join(str(c) for c in row) + " |", flush=True)
        del w, qs, w4, ws, sp, tss
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
