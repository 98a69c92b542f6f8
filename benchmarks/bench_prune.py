"""Benchmark the pruning solvers on one LLM-sized layer (4096 x 4096), all in one run:

- Wanda scoring + masking, unstructured 50% and 2:4: the library path (``calibra.prune``: scores, then
  ``calibra.ops.nm_mask`` native for N:M, a stable torch sort for unstructured) vs a pure-torch
  reference (``calibra.ops._ref.nm_mask`` for N:M; ``torch.topk`` for unstructured -- there is no
  native op for per-row top-k, so that row compares two torch selections), with ``torch.clone`` of the
  weight as the memory-bound roofline.
- The SparseGPT solver (unstructured 50% and 2:4): native block sweep vs the pure-torch sweep
  (``torch_block_sweep``). Unstructured runs ``calibra::gptq_block_sweep`` with the block's mask; 2:4
  runs ``calibra::sparsegpt_block_sweep``, which chooses the N:M mask inside the sweep.

    python benchmarks/bench_prune.py [--device cuda] [--quick] [--repeat N] [--sparsegpt-repeat N] [--threads N]
"""

import torch
from _common import clone_seconds, machine_line, median_seconds, parser, print_table

from calibra.ops import _ref, trace
from calibra.prune import NM, PruningConfig, Unstructured, sparsegpt_prune, torch_block_sweep, wanda_scores
from calibra.prune.patterns import prune_count


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--sparsegpt-repeat", type=int, default=1, help="timed SparseGPT runs (default: 1, it is slow)")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (default: torch's choice); 1 gives stable numbers on a loaded shared machine",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    print(machine_line(dev))
    out, n = (1024, 1024) if args.quick else (4096, 4096)
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(out, n, generator=g) / n**0.5).to(dev)
    x = torch.randn(2 * n, n, generator=g).to(dev)
    x[:, ::97] *= 10.0  # a few outlier channels
    h = x.double().T @ x.double()
    sumsq = h.diagonal().clone()
    t_clone = clone_seconds(w, repeat=args.repeat)

    rows = []
    k = prune_count(n, 0.5)

    def wanda_unstructured():
        return Unstructured().mask(wanda_scores(w, sumsq), 0.5, "row")

    def wanda_unstructured_ref():
        s = w.float().abs() * sumsq.sqrt().float()[None, :]
        keep = torch.ones_like(s, dtype=torch.bool)
        return keep.scatter_(1, torch.topk(s, k, dim=1, largest=False).indices, False)

    def wanda_24():
        return NM(2, 4).mask(wanda_scores(w, sumsq))

    def wanda_24_ref():
        return _ref.nm_mask(w.float().abs() * sumsq.sqrt().float()[None, :], 2, 4)

    assert torch.equal(wanda_24(), wanda_24_ref())
    assert int((~wanda_unstructured()).sum()) == int((~wanda_unstructured_ref()).sum())
    for label, lib, ref in (
        ("Wanda unstructured 50%", wanda_unstructured, wanda_unstructured_ref),
        ("Wanda 2:4", wanda_24, wanda_24_ref),
    ):
        t_lib = median_seconds(lib, dev, repeat=args.repeat)
        t_ref = median_seconds(ref, dev, warmup=1, repeat=max(3, args.repeat // 2))
        rows.append([label, f"{out}x{n}", t_lib * 1e3, t_ref * 1e3, f"{t_ref / t_lib:.2f}x", t_lib / t_clone])

    for label, pattern, ts in (("SparseGPT unstructured 50%", "unstructured", 0.5), ("SparseGPT 2:4", "2:4", None)):
        cfg = PruningConfig(method="sparsegpt", pattern=pattern, target_sparsity=ts)
        t_torch = median_seconds(
            lambda: sparsegpt_prune(w, h, 2 * n, cfg, measure=False, sweep=torch_block_sweep),
            dev,
            warmup=0,
            repeat=args.sparsegpt_repeat,
        )
        with trace() as t:
            t_nat = median_seconds(
                lambda: sparsegpt_prune(w, h, 2 * n, cfg, measure=False), dev, warmup=0, repeat=args.sparsegpt_repeat
            )
        op = "sparsegpt_block_sweep" if pattern == "2:4" else "gptq_block_sweep"
        if t.impls(op) != {dev.split(":")[0]}:
            print(f"note: {label}: {op} was served by {t.impls(op)}, not the native {dev} kernel")
        rows.append([label, f"{out}x{n}", t_nat * 1e3, t_torch * 1e3, f"{t_torch / t_nat:.2f}x", t_nat / t_clone])

    print_table(
        "Pruning solvers (ms, median)",
        ["case", "shape", "library / native ms", "reference ms", "reference / library", "x clone"],
        rows,
    )
    print(
        "\nSparseGPT: whole solver (factorization + sweep + lazy updates), native block sweep vs the pure-torch "
        "sweep. Unstructured: calibra::gptq_block_sweep with the block's mask; 2:4: calibra::sparsegpt_block_sweep "
        "(the N:M mask chosen inside the sweep)."
    )


if __name__ == "__main__":
    main()
