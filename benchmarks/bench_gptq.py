"""Benchmark GPTQ: the solve of one Linear (W4 g128 sym, block 128) with the native block sweep vs the
pure-torch reference sweep (the same driver with the sweep swapped), measured in one run. "sweep" is
the time spent inside the block sweep (native kernel or the reference's Python column loop); "total"
is the whole solve (Cholesky, lazy GEMMs, bookkeeping); the GEMM-only time of the lazy updates is
printed as the floor the sweep sits on.

    python benchmarks/bench_gptq.py [--quick] [--repeat N] [--device cpu|cuda]

With ``--device cuda`` the weight and Hessian live on the GPU: the native sweep is the CUDA kernel (asserted
per run), the reference is the same Python column loop issuing torch ops on the GPU, and every timing
synchronizes the device first. The default shape is then Llama-3-8B's down_proj (4096 x 14336).
"""

import time

import torch
from _common import machine_line, parser, print_table, sync

from calibra.ops import _registry
from calibra.quant import GPTQConfig, gptq_quantize
from calibra.quant.gptq import _native_sweep, reference_sweep


def realistic_hessian(n: int, tokens: int, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    """X^T X of correlated activations with a few outlier channels (like an LLM's hidden states)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g).to(device)
    x = x + 0.5 * torch.randn(tokens, 1, generator=g).to(device)  # shared component: strong correlations
    x[:, torch.randperm(n, generator=g)[: max(1, n // 256)].to(device)] *= 30.0
    return x.T @ x


class Timed:
    def __init__(self, fn, device: str):
        self.fn, self.device, self.seconds = fn, device, 0.0

    def __call__(self, *a):
        sync(self.device)
        t0 = time.perf_counter()
        r = self.fn(*a)
        sync(self.device)
        self.seconds += time.perf_counter() - t0
        return r


def solve(w, h, tokens, cfg, fn, device: str):
    timed = Timed(fn, device)
    sync(device)
    t0 = time.perf_counter()
    with _registry.trace() as t:
        r = gptq_quantize(w, h, tokens, cfg, sweep=timed)
        sync(device)
    if fn is _native_sweep and t.impls("gptq_block_sweep") != {device.split(":")[0]}:
        raise SystemExit(f"the native block sweep did not run on {device}: {sorted(t.impls('gptq_block_sweep'))}")
    return time.perf_counter() - t0, timed.seconds, r


def main() -> None:
    ap = parser(__doc__)
    args = ap.parse_args()
    device = args.device
    print(machine_line(device), f"torch threads {torch.get_num_threads()}")
    big = (4096, 14336) if device.startswith("cuda") else (4096, 4096)
    shapes = [(1024, 1024)] if args.quick else [big]
    repeat = max(1, min(args.repeat, 3))
    cfg = GPTQConfig(bits=4, group_size=128, sym=True, block_size=128)
    rows = []
    for out, n in shapes:
        torch.manual_seed(0)
        w = (torch.randn(out, n) * 0.02).to(device)
        h = realistic_hessian(n, 2 * n, device=device)
        res = {}
        for name, fn in (("native", _native_sweep), ("reference", reference_sweep)):
            solve(w, h, 2 * n, cfg, fn, device)  # warm-up (thread pool, allocator, BLAS, kernel load)
            runs = sorted((solve(w, h, 2 * n, cfg, fn, device) for _ in range(repeat)), key=lambda t: t[0])
            res[name] = runs[len(runs) // 2]
        assert torch.equal(res["native"][2].codes, res["reference"][2].codes), "native and reference codes differ"
        # the lazy-update GEMMs alone (same shapes as in the solve): the floor under both
        u = torch.randn(n, n, device=device)
        err = torch.randn(out, 128, device=device)
        sync(device)
        t0 = time.perf_counter()
        for i1 in range(0, n, 128):
            if i1 + 128 < n:
                w[:, i1 + 128 :].clone().addmm_(err, u[i1 : i1 + 128, i1 + 128 :], alpha=-1.0)
        sync(device)
        gemm = time.perf_counter() - t0
        tn, sn, _ = res["native"]
        tr, sr, _ = res["reference"]
        rows.append([f"{out}x{n}", "native", tn, sn, gemm, tr / tn, sr / sn])
        rows.append([f"{out}x{n}", "reference", tr, sr, gemm, 1.0, 1.0])
    print_table(
        "GPTQ solve, W4 g128 sym, block 128 (seconds, median)",
        ["shape", "sweep impl", "total s", "sweep s", "lazy GEMMs s", "total speedup", "sweep speedup"],
        rows,
    )


if __name__ == "__main__":
    main()
