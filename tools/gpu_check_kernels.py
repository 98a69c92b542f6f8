"""GPU drivers for tools/gpu_check.sh (also rehearsed on the CPU by its --dry-run).

python tools/gpu_check_kernels.py ops [--device cuda]
    Call every op of calibra.ops.OPS once on its small `example` (the one `calibra selftest` uses),
    synchronize after each, and assert that the native kernel of DEVICE served it. Small on purpose:
    gpu_check.sh runs it under compute-sanitizer (memcheck, racecheck). Exit 1 if an op failed or
    ran in its reference.

python tools/gpu_check_kernels.py gptq [--device cuda] [--shape 4096x14336] [--reference]
    GPTQ (W4 g128 sym, block 128) of one Llama-3-8B-shaped layer (down_proj: out 4096, in 14336) with a
    synthetic Hessian, timed; --reference also runs the pure-torch reference sweep and compares codes.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import calibra
from calibra.ops import _registry


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_ops(device: str) -> int:
    """Every op once on its example; returns the number of failures."""
    failures = 0
    names = sorted(_registry.OPS)
    missing = [n for n in names if _registry.OPS[n].example is None]
    if missing:
        print(f"ops without an example (not exercised): {missing}")
        failures += len(missing)
    for name in names:
        op = _registry.OPS[name]
        if op.example is None:
            continue
        torch.manual_seed(0)
        try:
            args = op.example(device)
            with _registry.trace() as t:
                getattr(torch.ops.calibra, name)(*args)
            _sync(device)
            impls = t.impls(name)
            ok = impls == {device.split(":")[0]}
            status = "ok" if ok else f"NOT NATIVE (served by {sorted(impls) or 'nothing'})"
        except Exception as e:  # one op's failure must not hide the others'
            ok, status = False, f"ERROR {type(e).__name__}: {e}"
        failures += not ok
        print(f"  {name:24s} {status}", flush=True)
    print(f"{len(names) - failures}/{len(names)} ops ran natively on {device}")
    return failures


def synthetic_hessian(n: int, tokens: int, device: str) -> torch.Tensor:
    """X^T X of correlated activations with a few outlier channels (as benchmarks/bench_gptq.py)."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, n, generator=g, device=device)
    x = x + 0.5 * torch.randn(tokens, 1, generator=g, device=device)
    x[:, torch.randperm(n, generator=g, device=device)[: max(1, n // 256)]] *= 30.0
    return x.T @ x


def run_gptq(device: str, shape: str, reference: bool) -> int:
    from calibra.quant import GPTQConfig, gptq_quantize
    from calibra.quant.gptq import reference_sweep

    out, n = (int(v) for v in shape.lower().split("x"))
    cfg = GPTQConfig(bits=4, group_size=128, sym=True, block_size=128)
    torch.manual_seed(0)
    w = (torch.randn(out, n) * 0.02).to(device)
    tokens = 2 * n
    t0 = time.perf_counter()
    h = synthetic_hessian(n, tokens, device)
    _sync(device)
    print(f"device {device}, weight {out}x{n}, Hessian from {tokens} tokens in {time.perf_counter() - t0:.2f} s")
    runs = [("native", None)] + ([("reference", reference_sweep)] if reference else [])
    codes = {}
    for label, sweep in runs:
        with _registry.trace() as t:
            t0 = time.perf_counter()
            q = gptq_quantize(w, h, tokens, cfg, sweep=sweep)
            _sync(device)
            dt = time.perf_counter() - t0
        codes[label] = q.codes
        print(f"  {label:9s} GPTQ solve: {dt:8.2f} s  (block sweep served by {sorted(t.impls('gptq_block_sweep'))})")
        if label == "native" and t.impls("gptq_block_sweep") != {device.split(":")[0]}:
            print("  FAILED: the native block sweep did not serve the solve")
            return 1
    if reference:
        same = (codes["native"] == codes["reference"]).float().mean().item()
        print(f"  codes equal to the reference: {100 * same:.4f}%")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p_ops = sub.add_parser("ops", help="every op once on a small shape")
    p_ops.add_argument("--device", default="cuda")
    p_gptq = sub.add_parser("gptq", help="GPTQ of one Llama-3-8B-shaped layer")
    p_gptq.add_argument("--device", default="cuda")
    p_gptq.add_argument("--shape", default="4096x14336", help="OUTxIN (default: 4096x14336, Llama-3-8B down_proj)")
    p_gptq.add_argument("--reference", action="store_true", help="also run the reference sweep and compare codes")
    args = ap.parse_args(argv)
    print(f"calibra {calibra.__version__}, torch {torch.__version__}", flush=True)
    if args.command == "ops":
        return 1 if run_ops(args.device) else 0
    return run_gptq(args.device, args.shape, args.reference)


if __name__ == "__main__":
    sys.exit(main())
