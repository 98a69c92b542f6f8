"""The memory planner against reality: predicted peak host memory (calibra.jobs.plan) vs the measured peak RSS
(VmHWM) of a fresh process running the same `calibra.quantize` job (GPTQ, CPU, no evaluation).

    PYTHONPATH=python python benchmarks/bench_memory_plan.py [--quick]

Cases: builtin:tiny-llama, builtin:tiny-moe, and a locally built random-weight Llama with realistic layer
shapes (hidden 2048, intermediate 5632, 16 query / 4 KV heads, 2 layers, bf16 on disk). tests/io/test_plan.py
runs the same measurement and asserts |predicted / measured - 1| <= 25%.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

CASES = {
    "builtin:tiny-llama": dict(samples=32, seq_len=256),
    "builtin:tiny-moe": dict(samples=32, seq_len=256),
    "llama-h2048": dict(samples=16, seq_len=256),
}


def build_h2048(folder: Path, layers: int = 2) -> Path:
    """A random-weight Llama with a 2048-wide residual stream (the builtin tokenizer's 4096 tokens)."""
    import shutil

    import torch
    import transformers

    from calibra.assets import ASSETS_DIR

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=4096,
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16)
    model.save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ASSETS_DIR / "models" / "tiny-llama" / f, folder / f)
    return folder


def measure(spec: str, samples: int, seq_len: int, out: Path) -> dict:
    """Run the job in a fresh interpreter; return the plan's prediction and the measured peak RSS."""
    child = textwrap.dedent(f"""
        import json, resource, sys
        import calibra
        from calibra.data import CalibrationConfig
        from calibra.quant import GPTQConfig
        _, report = calibra.quantize({spec!r}, GPTQConfig(group_size=128),
                                     CalibrationConfig(num_samples={samples}, sequence_length={seq_len}, seed=0),
                                     output={str(out)!r}, evaluate=False, progress=False, echo=None)
        # VmHWM: this process's own peak RSS. ru_maxrss would also count the parent's pages: Linux carries
        # the high-water mark of the forked (vfork'ed) pre-exec image across execve.
        peak = next((int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:")),
                    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        print("RESULT " + json.dumps({{"predicted": report["plan"]["peak_host"], "measured": peak,
                                       "phase": report["plan"]["host_phase"], "host": report["plan"]["host"],
                                       "phases": report["plan"]["phases"]}}))
    """)
    import calibra

    env = dict(os.environ, PYTHONPATH=str(Path(calibra.__file__).resolve().parent.parent))
    r = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=900)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode or not line:
        raise RuntimeError(f"{spec}: the job failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    res = json.loads(line[0][len("RESULT ") :])
    res["ratio"] = res["predicted"] / res["measured"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", default=",".join(CASES))
    args = ap.parse_args()
    mib = 2**20
    print("| model | samples x seq_len | predicted peak host MiB | measured peak RSS MiB | predicted / measured |")
    print("|---|---|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases.split(","):
            spec = name if name.startswith("builtin:") else str(build_h2048(Path(tmp) / name))
            c = CASES[name]
            r = measure(spec, c["samples"], c["seq_len"], Path(tmp) / f"out-{name.replace(':', '-')}")
            print(
                f"| {name} | {c['samples']} x {c['seq_len']} | {r['predicted'] / mib:.0f} | {r['measured'] / mib:.0f} "
                f"| {r['ratio']:.3f} |",
                flush=True,
            )
            print("    " + json.dumps({k: round(v / mib, 1) for k, v in r["host"].items()}), file=sys.stderr)
            print("    phases " + json.dumps({k: round(v / mib, 1) for k, v in r["phases"].items()}), file=sys.stderr)


if __name__ == "__main__":
    main()
