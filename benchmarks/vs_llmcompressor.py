#!/usr/bin/env python
"""calibra vs llmcompressor, GPTQ W4A16 on the CPU, side by side in one run: time and perplexity.

    PYTHONPATH=python python benchmarks/vs_llmcompressor.py                        # builtin:tiny-llama
    PYTHONPATH=python python benchmarks/vs_llmcompressor.py --samples 64 --json out.json \\
        --llmc-python /path/to/venv/bin/python

llmcompressor runs in its own virtual environment (``--llmc-python``, default
``build/client-venvs/llmc/bin/python`` of this checkout; ``tools/client_lane.sh setup`` creates it),
calibra in this one. Both get the same model files and exactly the same calibration token ids:

1. The model (``--model builtin:NAME`` or a local folder) is copied to a temporary folder.
2. The builtin calibration text is tokenized once per calibration seed with calibra's pipeline
   (``tokenize_calibration``: ``--samples`` x ``--seq-len`` tokens, concat packing, ``--seeds``, default
   0,1,2) and saved as ``calib-<seed>.safetensors``. Every tool quantizes once per seed: at W4 g128 a
   small model's perplexity changes by a few hundredths, about as much as it varies between calibration
   draws, so one draw cannot rank the tools; the table reports the mean over the seeds and each seed's.
3. ``_llmc_driver.py`` (llmc venv): ``oneshot(model, dataset=Dataset{input_ids, attention_mask},
   recipe=GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head"], block_size=128,
   dampening_frac=0.01, actorder=...))``, then ``save_pretrained(save_compressed=True)``. Two rows
   (``--llmc-variants``): ``actorder=None`` (no act-order), and ``actorder="static"``, llmcompressor's
   default (columns in act-order, group scales fitted on the original weights before the sweep).
4. ``_calibra_driver.py`` (this env): ``calibra.quantize(model, GPTQConfig(bits=4, group_size=128,
   sym=True, damp_percent=0.01, block_size=128, ...), (input_ids, attention_mask))``, then
   ``calibra.export(..., "compressed-tensors")``. Rows (``--variants``):

   * **defaults**: calibra's defaults, AutoGPTQ's: no act-order, group scales fitted on the updated
     weights as the sweep reaches each group, true-sequential (each group's Hessians collected after
     the groups before it are quantized). Compare with llmcompressor ``actorder=None``.
   * **act-order**: ``desc_act=True, static_groups=True`` (``--desc-act --static-groups``), otherwise the
     defaults: the same act-order rule as llmcompressor's default, contiguous groups (no g_idx).
     Compare with llmcompressor ``actorder="static"``.
   * **matched**: ``static_groups=True`` and ``true_sequential=False`` (one Hessian pass per decoder
     layer, as llmcompressor's sequential pipeline): llmcompressor ``actorder=None``'s algorithm.
   * **fast**: as matched, with dynamic groups.
   * **static-groups**: the defaults with ``static_groups=True`` (group scales fitted on the original
     weights before the sweep, as llmcompressor does for every actorder).

   Both tools propagate the quantized layer's outputs to the next layer, compute in float32 (model
   loaded in float32; Hessians and the GPTQ sweep in float32) and use the same threads. llmcompressor
   runs one sample per forward pass (its default), calibra about 4096 tokens per pass (its default).
5. Timing: "quantize s" is the quantization call alone (``oneshot`` / ``calibra.quantize``: calibration
   forward passes + GPTQ solves; no model load, no save); "end-to-end s" is the wall time of the whole
   subprocess (interpreter start, imports, load, quantize, save). The tools run one after the other in
   one run (``--repeat N`` alternates them N times and reports medians); the load average is recorded.
6. Perplexity with one protocol, calibra's evaluator in this environment: both outputs are loaded
   from disk with transformers + compressed-tensors (dequantized on the first forward), the builtin
   held-out eval text, windows of ``--eval-seq-len`` (256) every ``--eval-stride`` (128) tokens, float32
   logits. KL = mean over scored tokens of KL(P_unquantized || P_quantized), top-64 buckets (a lower
   bound of the exact KL; ``calibra.eval.kl``).

Prints a Markdown table (tool, quantize s and end-to-end s as medians over seeds and repeats, mean ppl,
mean delta ppl, each seed's delta ppl, mean KL) and, with ``--json``, writes everything (timings split by
phase, per-seed results, versions, settings, protocol, load averages).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DEFAULT_LLMC_PYTHON = ROOT / "build" / "client-venvs" / "llmc" / "bin" / "python"

#: (row label, extra driver flags)
CALIBRA_VARIANTS = {
    "defaults": ("calibra defaults (no act-order, true-sequential)", []),
    "act-order": ("calibra --desc-act --static-groups (true-sequential)", ["--desc-act", "--static-groups"]),
    "matched": (
        "calibra matched (no act-order, static groups, 1 pass/layer)",
        ["--static-groups", "--no-true-sequential"],
    ),
    "fast": ("calibra (no act-order, dynamic groups, 1 pass/layer)", ["--no-true-sequential"]),
    "static-groups": ("calibra --static-groups (no act-order, true-sequential)", ["--static-groups"]),
}
LLMC_VARIANTS = {
    "none": ("llmcompressor 0.14 GPTQModifier W4A16, actorder=None", ["--actorder", "none"]),
    "static": ("llmcompressor 0.14 GPTQModifier W4A16, actorder=static (its default)", ["--actorder", "static"]),
}


class SetupError(RuntimeError):
    pass


def check_llmc_python(path: Path) -> Path:
    if not path.exists():
        raise SetupError(
            f"llmcompressor's virtual environment is missing: {path} does not exist.\n"
            f"Create it with `tools/client_lane.sh setup` (it builds build/client-venvs/llmc with "
            f"llmcompressor==0.14.0.1), or pass --llmc-python PATH of a python that can "
            f"`import llmcompressor`."
        )
    probe = subprocess.run(
        [str(path), "-c", "import llmcompressor, datasets, safetensors"],
        capture_output=True,
        text=True,
        env=_child_env(),
        timeout=300,
    )
    if probe.returncode != 0:
        raise SetupError(
            f"{path} cannot import llmcompressor/datasets/safetensors:\n{probe.stderr[-2000:]}\n"
            f"Recreate the environment with `tools/client_lane.sh setup`."
        )
    return path


def _child_env(extra_pythonpath: str | None = None) -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    if extra_pythonpath:
        env["PYTHONPATH"] = extra_pythonpath
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU for both, whatever the machine has
    env["TOKENIZERS_PARALLELISM"] = "false"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    return env


def prepare(args, work: Path) -> Path:
    """Copy the model into the work folder."""
    from calibra.assets import resolve_model

    model_dir = work / "model"
    shutil.copytree(resolve_model(args.model), model_dir)
    return model_dir


def calibration_ids(args, model_dir: Path, seed: int, work: Path) -> tuple[Path, dict]:
    """Tokenize the calibration text once for ``seed`` and save the ids both tools read."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoTokenizer

    from calibra.data import CalibrationConfig, CalibrationDataset, model_max_positions, tokenize_calibration

    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    cfg = CalibrationConfig(num_samples=args.samples, sequence_length=args.seq_len, seed=seed)
    data = tokenize_calibration(
        CalibrationDataset.from_source(args.dataset),
        tok,
        cfg,
        max_positions=model_max_positions(AutoConfig.from_pretrained(model_dir)),
    )
    calib = work / f"calib-{seed}.safetensors"
    save_file(
        {"input_ids": data.input_ids.contiguous(), "attention_mask": data.attention_mask.to(torch.int8)}, str(calib)
    )
    return calib, {
        "dataset": data.dataset,
        "version": data.version,
        "samples": data.num_samples,
        "sequence_length": data.sequence_length,
        "tokens": data.token_count,
        "seed": data.seed,
        "packing": data.packing,
        "fingerprint": data.fingerprint,
    }


def run_tool(name: str, cmd: list[str], env: dict, log: Path, timeout: float) -> dict:
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        try:
            _, status, usage = _wait4(proc, timeout)
        except BaseException:
            proc.kill()
            raise
    wall = time.perf_counter() - t0
    load_after = os.getloadavg()
    proc.returncode = os.waitstatus_to_exitcode(status)
    peak = usage.ru_maxrss * 1024  # the child's VmHWM
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"{name} failed (exit {proc.returncode}); last lines of {log}:\n{tail}")
    print(
        f"  {name}: {wall:.1f} s end-to-end, peak RSS {peak / 2**30:.2f} GiB (load average {load_before[0]:.1f} -> "
        f"{load_after[0]:.1f})",
        file=sys.stderr,
    )
    return {"end_to_end": wall, "peak_rss": peak, "loadavg_before": load_before, "loadavg_after": load_after}


def _wait4(proc, timeout: float):
    """``os.wait4`` of the child (its exit status and resource usage: ru_maxrss is its peak RSS), with a
    timeout."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            return pid, status, usage
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(proc.args, timeout)
        time.sleep(0.05)


def evaluate_outputs(args, model_dir: Path, outputs: dict) -> dict:
    """Baseline + every output through calibra's evaluator, one protocol, one reference."""
    import torch
    from transformers import AutoModelForCausalLM

    from calibra.assets import builtin_texts, load_model
    from calibra.eval import collect_reference, compare
    from calibra.eval.windows import dataset_version, token_stream

    base, tok = load_model(str(model_dir), dtype="float32")
    texts = builtin_texts("eval")
    ids = torch.tensor(token_stream(tok, texts), dtype=torch.long)
    if args.eval_max_tokens:
        ids = ids[: args.eval_max_tokens]
    t0 = time.perf_counter()
    ref = collect_reference(base, ids, seq_len=args.eval_seq_len, stride=args.eval_stride, top_k=64, progress=False)
    base_ppl = math.exp(ref.nll())
    print(
        f"  unquantized: ppl {base_ppl:.4f} ({ref.tokens} tokens scored, {time.perf_counter() - t0:.0f} s)",
        file=sys.stderr,
    )
    del base
    out = {
        "protocol": {
            "dataset": "builtin:eval",
            "version": dataset_version(texts),
            "documents": len(texts),
            "stream_tokens": int(ids.numel()),
            "tokens_scored": ref.tokens,
            "seq_len": args.eval_seq_len,
            "stride": args.eval_stride,
            "top_k": ref.top_k,
            "loader": "transformers AutoModelForCausalLM.from_pretrained(dtype=float32) + compressed-tensors",
        },
        "baseline": base_ppl,
        "rows": {},
    }
    for key, folder in outputs.items():
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
        r = compare(model, ref, ids, progress=False)
        out["rows"][key] = {"ppl": r.ppl_compressed, "kl": r.kl_ref_cmp["mean"], "kl_max": r.kl_ref_cmp["max"]}
        print(
            f"  {key[0]} (seed {key[1]}): ppl {r.ppl_compressed:.4f}, KL {r.kl_ref_cmp['mean']:.5f} "
            f"({time.perf_counter() - t0:.0f} s)",
            file=sys.stderr,
        )
        del model
    return out


def table(rows: list[dict], base_ppl: float, seeds: list[int]) -> str:
    per_seed = " / ".join(str(sd) for sd in seeds)
    lines = [
        f"| tool | quantize s | end-to-end s | peak RSS GiB | ppl | Δppl | Δppl, seed {per_seed} | KL |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| unquantized (float32) | – | – | – | {base_ppl:.3f} | – | – | – |",
    ]
    for r in rows:
        each = " / ".join(f"{p - base_ppl:+.3f}" for p in r["ppl_per_seed"])
        lines.append(
            f"| {r['label']} | {r['quantize_s']:.1f} | {r['end_to_end_s']:.1f} | {r['peak_rss'] / 2**30:.2f} | "
            f"{r['ppl']:.3f} | "
            f"{r['ppl'] - base_ppl:+.3f} | {each} | {r['kl']:.5f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="builtin:tiny-llama", help="builtin:NAME or a local model folder")
    ap.add_argument("--samples", type=int, default=128, help="calibration samples (default 128)")
    ap.add_argument("--seq-len", type=int, default=256, help="tokens per calibration sample (default 256)")
    ap.add_argument(
        "--seeds",
        default="0,1,2",
        help="calibration seeds, comma-separated: every tool quantizes "
        "once per seed; ppl and KL are averaged (default 0,1,2)",
    )
    ap.add_argument("--dataset", default="builtin", help="calibration text source (default: builtin)")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument(
        "--llmc-python",
        type=Path,
        default=DEFAULT_LLMC_PYTHON,
        help=f"python of llmcompressor's venv (default {DEFAULT_LLMC_PYTHON.relative_to(ROOT)})",
    )
    ap.add_argument(
        "--variants",
        default="defaults,act-order",
        help=f"calibra rows, comma-separated from {', '.join(CALIBRA_VARIANTS)} (default defaults,act-order)",
    )
    ap.add_argument(
        "--llmc-variants",
        default="none,static",
        help=f"llmcompressor rows, comma-separated from {', '.join(LLMC_VARIANTS)} (default none,static)",
    )
    ap.add_argument("--repeat", type=int, default=1, help="alternate the tools N times; medians are reported")
    ap.add_argument("--eval-seq-len", type=int, default=256)
    ap.add_argument("--eval-stride", type=int, default=128)
    ap.add_argument("--eval-max-tokens", type=int, default=None, help="cut the eval stream (default: all of it)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per quantization subprocess")
    ap.add_argument("--keep", type=Path, default=None, help="keep the work folder (outputs, logs) here")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    llmc_variants = [v.strip() for v in args.llmc_variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in CALIBRA_VARIANTS] + [v for v in llmc_variants if v not in LLMC_VARIANTS]
    if bad or args.repeat < 1:
        ap.error(
            f"--variants must be from {', '.join(CALIBRA_VARIANTS)}, --llmc-variants from "
            f"{', '.join(LLMC_VARIANTS)} (got {bad}); --repeat >= 1"
        )
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        seeds = []
    if not seeds or len(set(seeds)) != len(seeds):
        ap.error(f"--seeds must be distinct integers, comma-separated (got {args.seeds!r})")
    try:  # only the llmcompressor runs need its environment (--llmc-variants "" runs calibra alone)
        llmc_python = check_llmc_python(args.llmc_python) if llmc_variants else None
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    started = datetime.datetime.now(datetime.timezone.utc)
    work = Path(tempfile.mkdtemp(prefix="calibra-vs-llmc-")) if args.keep is None else args.keep
    work.mkdir(parents=True, exist_ok=True)
    loads = [os.getloadavg()]
    try:
        model_dir = prepare(args, work)
        tools = {
            f"llmc-{v}": ([str(llmc_python), str(HERE / "_llmc_driver.py"), *LLMC_VARIANTS[v][1]], _child_env())
            for v in llmc_variants
        }
        for v in variants:
            tools[f"calibra-{v}"] = (
                [sys.executable, str(HERE / "_calibra_driver.py"), *CALIBRA_VARIANTS[v][1]],
                _child_env(str(ROOT / "python")),
            )
        runs: dict[str, list] = {k: [] for k in tools}
        outputs, calibrations = {}, {}
        for seed in seeds:
            calib, c = calibration_ids(args, model_dir, seed, work)
            calibrations[seed] = c
            print(
                f"seed {seed}: {c['samples']} x {c['sequence_length']} tokens ({c['tokens']} real), "
                f"fingerprint {c['fingerprint'][:16]}; work folder {work}",
                file=sys.stderr,
            )
            common = ["--model", str(model_dir), "--calib", str(calib), "--group-size", str(args.group_size)]
            for rep in range(args.repeat):
                for key, (cmd, env) in tools.items():
                    tag = f"{key}-s{seed}-{rep}"
                    out_dir, js = work / tag, work / f"{tag}.json"
                    res = run_tool(
                        f"{key} (seed {seed})",
                        [*cmd, *common, "--output", str(out_dir), "--json", str(js)],
                        env,
                        work / f"{tag}.log",
                        args.timeout,
                    )
                    res["driver"] = json.loads(js.read_text(encoding="utf-8"))
                    runs[key].append(res)
                    loads.append(os.getloadavg())
                    outputs[(key, seed)] = out_dir  # the last repetition's output is evaluated
        ev = evaluate_outputs(args, model_dir, outputs)
        loads.append(os.getloadavg())
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)

    rows = []
    for key, rs in runs.items():
        llmc = key.startswith("llmc-")
        t_q = statistics.median(r["driver"]["timings"]["oneshot" if llmc else "quantize"] for r in rs)
        label = (LLMC_VARIANTS if llmc else CALIBRA_VARIANTS)[key.split("-", 1)[1]][0]
        d = rs[-1]["driver"]
        per = [ev["rows"][(key, sd)] for sd in seeds]
        rows.append(
            {
                "key": key,
                "label": label,
                "quantize_s": t_q,
                "end_to_end_s": statistics.median(r["end_to_end"] for r in rs),
                "peak_rss": statistics.median(r["peak_rss"] for r in rs),
                "ppl": statistics.fmean(p["ppl"] for p in per),
                "kl": statistics.fmean(p["kl"] for p in per),
                "ppl_per_seed": [p["ppl"] for p in per],
                "kl_per_seed": [p["kl"] for p in per],
                "timings": [r["driver"]["timings"] for r in rs],
                "end_to_end": [r["end_to_end"] for r in rs],
                "threads": d["threads"],
                "model_dtype": d["model_dtype"],
                "versions": d["versions"],
                "settings": d.get("recipe") or d.get("config"),
                "report_timings": [r["driver"].get("report_timings") for r in rs],
            }
        )
    one_min = [la[0] for la in loads] + [
        la for r in runs.values() for x in r for la in (x["loadavg_before"][0], x["loadavg_after"][0])
    ]
    result = {
        "date": started.strftime("%Y-%m-%d %H:%M UTC"),
        "model": args.model,
        "seeds": seeds,
        "calibration": {str(sd): c for sd, c in calibrations.items()},
        "group_size": args.group_size,
        "repeat": args.repeat,
        "eval": ev["protocol"],
        "baseline_ppl": ev["baseline"],
        "rows": rows,
        "loadavg_1min": {"min": min(one_min), "max": max(one_min), "all": loads},
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
        },
        "command": "PYTHONPATH=python python benchmarks/vs_llmcompressor.py " + " ".join(argv or sys.argv[1:]),
    }
    print()
    print(table(rows, ev["baseline"], seeds))
    print()
    print(
        f"{args.model}, {c['samples']} x {c['sequence_length']} calibration tokens (same ids for both; seeds "
        f"{','.join(map(str, seeds))}; ppl and KL are means over the seeds), "
        f"W4 g{args.group_size} sym; eval: builtin held-out text, {ev['protocol']['tokens_scored']} tokens, "
        f"seq_len {args.eval_seq_len} / stride {args.eval_stride}; {os.cpu_count()} CPUs, 1-min load average "
        f"{min(one_min):.1f}-{max(one_min):.1f}; {result['date']}"
    )
    for r in rows:
        parts = ", ".join(f"{k} {v:.1f}" for k, v in r["timings"][-1].items())
        print(f"  {r['key']}: {parts}", file=sys.stderr)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
