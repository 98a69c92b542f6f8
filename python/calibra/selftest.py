"""`calibra selftest`: run every op's native kernel on a small example and compare it with the
pure-torch reference. A quick way for a user to see that the installed wheel works on their machine."""

from __future__ import annotations

import torch

from calibra.ops import _registry


def _same(a, b) -> bool:
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if a is None or b is None:
        return a is b
    a, b = a.cpu(), b.cpu()
    if a.dtype.is_floating_point:
        return torch.allclose(a.double(), b.double(), rtol=1e-3, atol=1e-3, equal_nan=True)
    return torch.equal(a, b)


def run_selftest(device: str = "cpu", verbose: bool = False) -> bool:
    ok = True
    for name, op in sorted(_registry.OPS.items()):
        if op.example is None:
            continue
        torch.manual_seed(0)
        args = op.example(device)
        ref_args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
        with _registry.trace() as t:
            ours = getattr(torch.ops.calibra, name)(*args)
        if ours is None:  # in-place op: compare the mutated first argument
            ours, ref = args[0], (op.ref(*ref_args), ref_args[0])[1]
        else:
            ref = op.ref(*ref_args)
        impl = ",".join(sorted(t.impls(name)))
        good = _same(ours, ref) and impl == device
        ok &= good
        if verbose:
            print(f"  {name:22s} {impl:5s} {'ok' if good else 'MISMATCH' if impl == device else 'NOT NATIVE'}")
    if verbose and device != "mps":
        for line in metal_kernel_lines():
            print(line)
    return ok


def metal_kernel_lines() -> list[str]:
    """The Metal kernels of each op, for machines where they cannot run here: what exists, and that it has
    not run (on a Mac, ``calibra selftest --device mps`` runs them in the lines above)."""
    from calibra import _metal, _native

    if _native.load("mps") is None:
        here = f"not runnable here ({_native.load_failure('mps') or 'no MPS device'})"
    else:
        here = "runnable here: `calibra selftest --device mps` runs them"
    lines = [f"  Metal kernels (metal/*.metal, for mps tensors on Apple Silicon): {here}"]
    for name, kernels in sorted(_metal.OP_KERNELS.items()):
        apple = all(k in _metal.RUN_ON_APPLE_HARDWARE for k in kernels)
        status = "run on Apple hardware" if apple else "never run on Apple hardware (CPU harness only)"
        lines.append(f"  {name:22s} metal {', '.join(kernels)}: {status}")
    return lines
