#!/usr/bin/env python
"""calibra quantize at realistic scale on this machine: wall time per stage, peak RSS, the planner's
prediction, bytes read from disk.

    PYTHONPATH=python python benchmarks/bench_scale.py --shape 8b --methods rtn,gptq
    PYTHONPATH=python python benchmarks/bench_scale.py --shape 8b --layers 4 --methods gptq   # quick check
    PYTHONPATH=python python benchmarks/bench_scale.py --shape 1b --methods gptq --json out.json

The checkpoints are random bf16 weights with real configs (Llama-3-8B, TinyLlama-1.1B), written once into
``$CALIBRA_BENCH_CACHE`` (default ``~/.cache/calibra-bench``, never in the repository) by
``_scale_checkpoint.py``. ``--layers K`` runs on the first K decoder layers: a folder beside the full one
with ``num_hidden_layers = K`` and those layers' tensors (copied once, cached too).

Each method runs ``python -m calibra quantize`` as a child process (GPTQ: W4 g128, ``--samples`` x
``--seq-len`` calibration tokens, default 8 x 512; RTN: W4 g128), exported as compressed-tensors, with
``--no-eval``. Reported per run: wall time, the stages from report.json (calibration, solve, writing the
rest), the child's peak RSS (``ru_maxrss`` from ``wait4``: its VmHWM), the planner's predicted peak, and
the bytes the job read from the weight files. ``--check-load OUT`` loads a kept export (``--out DIR``) in
transformers + compressed-tensors, cut to its first decoder layer, and compares the logits with calibra's own
dequantization of the same tensors.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _scale_checkpoint import cache_dir, ensure  # noqa: E402

GIB = 2**30


def limited(folder: Path, k: int) -> Path:
    """A copy of ``folder`` with only its first ``k`` decoder layers (the same tensors, new shards)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    cfg = json.loads((folder / "config.json").read_text())
    if k >= cfg["num_hidden_layers"]:
        return folder
    out = folder.with_name(f"{folder.name}-layers{k}")
    if (out / "config.json").exists():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    index = json.loads((folder / "model.safetensors.index.json").read_text())

    def keep(name: str) -> bool:
        parts = name.split(".")
        return not (len(parts) > 2 and parts[1] == "layers" and int(parts[2]) >= k)

    wm = {}
    for src in sorted(set(index["weight_map"].values())):
        names = [n for n, f in index["weight_map"].items() if f == src and keep(n)]
        if not names:
            continue
        with safe_open(str(folder / src), "pt") as f:
            part = {n: f.get_tensor(n) for n in names}
        save_file(part, str(tmp / src), metadata={"format": "pt"})
        wm.update(dict.fromkeys(names, src))
        del part
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}, indent=2))
    cfg["num_hidden_layers"] = k
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (folder / f).exists():
            shutil.copy(folder / f, tmp / f)
    os.rename(tmp, out)
    return out


def gptq_floor_flops(cfg: dict, samples: int, seq_len: int) -> dict:
    """The floating-point work a GPTQ job cannot avoid, per the algorithm (issue 17's floor): per decoder
    layer one statistics forward and one propagation forward (the Linears, 2 flops per weight per token,
    plus causal attention), the Hessians' unique half (T d^2 per distinct input: q/k/v share one, gate/up
    share one), one Cholesky and one triangular inverse per quantized module ((1/3 + 1/3) in^3) and each
    module's sweep (out in^2: the error fed to the columns to its right)."""
    H, I, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    nh, kvh = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or H // nh
    T = samples * seq_len
    mods = [(nh * hd, H), (kvh * hd, H), (kvh * hd, H), (H, nh * hd), (I, H), (I, H), (H, I)]
    linear = 2 * T * sum(o * i for o, i in mods)
    attention = 2 * T * seq_len * nh * hd  # QK^T and AV, causal: half of 2 x 2 T L d
    forward = linear + attention
    hessians = T * (H * H + (nh * hd) ** 2 + H * H + I * I)
    factor = sum((2 / 3) * i**3 for _, i in mods)
    sweep = sum(o * i * i for o, i in mods)
    per_layer = {"forwards": 2 * forward, "hessians": hessians, "factorizations": factor, "sweeps": sweep}
    return {k: v * n for k, v in per_layer.items()}


def matmul_rate(seconds: float = 3.0) -> float:
    """This machine's float32 matmul rate now (FLOP/s): 2048^3 products for about ``seconds``."""
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        torch.mm(a, b)
        n += 1
    return n * 2 * 2048**3 / (time.perf_counter() - t0)


def run_quantize(folder: Path, method: str, out: Path, args) -> dict:
    cmd = [sys.executable, "-m", "calibra", "quantize", "--input", str(folder), "--output", str(out)]
    cmd += ["--method", method, "--bits", "4", "--group-size", "128", "--no-eval", "--no-progress"]
    cmd += ["--export", "compressed-tensors", "--overwrite"]
    if method != "rtn":
        cmd += ["--samples", str(args.samples), "--seq-len", str(args.seq_len)]
    if args.stream is not None:
        cmd += ["--stream" if args.stream else "--no-stream"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        print(log)
        raise SystemExit(f"calibra quantize failed with exit code {code}")
    rep = json.loads((out / "report.json").read_text())
    t = rep["timings"]
    return {
        "method": method,
        "wall_s": wall,
        "job_s": t["total"],
        "calibration_s": t.get("calibration"),
        "solve_s": t.get("solve"),
        "write_rest_s": t.get("write_rest"),
        "peak_rss": usage.ru_maxrss * 1024,
        "predicted_peak": rep["plan"]["peak_host"],
        "placement": rep["plan"]["placement"],
        "bytes_read": rep.get("streaming", {}).get("bytes_read"),
        "rss_after_layer": rep.get("streaming", {}).get("rss_after_layer"),
        "output_bytes": sum(p.stat().st_size for p in out.iterdir() if p.is_file()),
    }


def check_load(out: Path, layers: int = 1) -> dict:
    """The export loads in transformers + compressed-tensors: a copy of it cut to its first ``layers``
    decoder layers (config and index rewritten, the same tensors) is loaded with ``from_pretrained`` in
    float32, and its logits on random token ids are compared with a plain model whose weights calibra
    rebuilt from the same packed codes and scales (``calibra.ops.unpack``). Both decompress the same
    codes, so the difference should be float noise; returns the max |difference| and the logits' scale."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from calibra.ops import unpack

    cut = out.with_name(out.name + f"-first{layers}")
    shutil.rmtree(cut, ignore_errors=True)
    cut.mkdir()
    cfg = json.loads((out / "config.json").read_text())
    cfg["num_hidden_layers"] = layers
    (cut / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (out / f).exists():
            shutil.copy(out / f, cut / f)
    index = json.loads((out / "model.safetensors.index.json").read_text())

    def keep(name: str) -> bool:
        parts = name.split(".")
        return not (len(parts) > 2 and parts[1] == "layers" and int(parts[2]) >= layers)

    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        names = [n for n, f in index["weight_map"].items() if f == shard and keep(n)]
        if names:
            with safe_open(str(out / shard), "pt") as f:
                tensors.update({n: f.get_tensor(n) for n in names})
    save_file(tensors, str(cut / "model.safetensors"), metadata={"format": "pt"})

    # calibra's reading of the same tensors: w = (code - 2^(b-1)) * scale per group (symmetric int)
    qc = cfg["quantization_config"]["config_groups"]["group_0"]["weights"]
    bits, gs = qc["num_bits"], qc["group_size"]
    dense = {}
    for n, t in tensors.items():
        if n.endswith(".weight_packed"):
            base = n[: -len(".weight_packed")]
            o, i = tensors[base + ".weight_shape"].tolist()
            codes = unpack(t, bits, length=i).float() - 2 ** (bits - 1)
            scale = tensors[base + ".weight_scale"].float().repeat_interleave(gs, dim=1)[:, :i]
            dense[base + ".weight"] = codes * scale
        elif not n.endswith((".weight_scale", ".weight_shape", ".weight_zero_point")):
            dense[n] = t.float()
    plain_cfg = AutoConfig.from_pretrained(cut)
    del plain_cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(plain_cfg).float().eval()
    plain.load_state_dict(dense, strict=True)
    loaded = AutoModelForCausalLM.from_pretrained(cut, dtype=torch.float32).eval()
    ids = torch.randint(0, int(cfg["vocab_size"]), (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = loaded(ids).logits, plain(ids).logits
    shutil.rmtree(cut, ignore_errors=True)
    return {"layers": layers, "max_abs_diff": float((a - b).abs().max()), "logit_scale": float(b.abs().max())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=["8b", "1b"], default="8b")
    ap.add_argument("--layers", type=int, default=None, help="only the first K decoder layers")
    ap.add_argument("--methods", default="rtn,gptq")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--out", default=None, help="output folder (default: a temporary one, removed)")
    ap.add_argument("--keep", action="store_true", help="keep the outputs")
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--check-load",
        metavar="OUT",
        default=None,
        help="only check that the compressed-tensors export in OUT loads in transformers (first decoder layer)",
    )
    args = ap.parse_args()
    if args.check_load:
        r = check_load(Path(args.check_load))
        print(
            f"transformers + compressed-tensors load of {args.check_load} (first {r['layers']} layer): max |logits "
            f"- calibra's dequantization| = {r['max_abs_diff']:.3g} (logits up to {r['logit_scale']:.3g})"
        )
        return 0

    folder = ensure(args.shape, echo=print)
    if args.layers:
        folder = limited(folder, args.layers)
    base = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="calibra-scale-", dir=cache_dir()))
    rows = []
    for method in args.methods.split(","):
        out = base / method
        print(f"{args.shape} ({folder.name}) {method} ...", flush=True)
        r = run_quantize(folder, method, out, args)
        rows.append(r)
        print(
            f"  wall {r['wall_s']:.0f} s (job {r['job_s']:.0f}: calibration {r['calibration_s'] or 0:.0f}, "
            f"solve {r['solve_s'] or 0:.0f}, write rest {r['write_rest_s'] or 0:.0f}); peak RSS "
            f"{r['peak_rss'] / GIB:.2f} GiB, predicted {r['predicted_peak'] / GIB:.2f} GiB "
            f"({r['peak_rss'] / r['predicted_peak']:.2f}x); read {(r['bytes_read'] or 0) / 1e9:.1f} GB; "
            f"output {r['output_bytes'] / 1e9:.2f} GB",
            flush=True,
        )
        if not args.keep and args.out is None:
            shutil.rmtree(out, ignore_errors=True)
    cfg = json.loads((folder / "config.json").read_text())
    if any(r["method"] == "gptq" for r in rows):
        rate = matmul_rate()
        fl = gptq_floor_flops(cfg, args.samples, args.seq_len)
        floor_s = sum(fl.values()) / rate
        for r in rows:
            if r["method"] == "gptq":
                r["floor"] = {"flops": fl, "matmul_flops_per_s": rate, "floor_s": floor_s}
        job = next(r["job_s"] for r in rows if r["method"] == "gptq")
        print(
            f"GPTQ arithmetic floor: {sum(fl.values()) / 1e12:.2f} TFLOP ("
            + ", ".join(f"{k} {v / 1e12:.2f}" for k, v in fl.items())
            + f") at {rate / 1e9:.0f} GFLOP/s (float32 matmul, measured now) = {floor_s:.0f} s; "
            f"the job took {job:.0f} s = {job / floor_s:.2f}x the floor"
        )
    print()
    print("| model | layers | method | wall s | peak RSS GiB | predicted GiB | ratio | read GB |")
    print("|---|---|---|---|---|---|---|---|")
    n = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    for r in rows:
        print(
            f"| {args.shape} | {n} | {r['method']} | {r['wall_s']:.0f} | {r['peak_rss'] / GIB:.2f} | "
            f"{r['predicted_peak'] / GIB:.2f} | {r['peak_rss'] / r['predicted_peak']:.2f} | "
            f"{(r['bytes_read'] or 0) / 1e9:.1f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"shape": args.shape, "layers": n, "rows": rows}, indent=1))
    if args.out is None and not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
