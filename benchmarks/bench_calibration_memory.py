"""Peak memory of the layer-sequential runner versus model depth.

For Llama models of the same width (hidden 256, intermediate 688, 4 heads) and 4..32 layers, each in a
fresh process: build the random-weight model, then run ``LayerRunner`` (Hessian observer) over
S x L tokens and record

* on CUDA (when available): ``torch.cuda.max_memory_allocated`` with the model kept on the CPU and
  ``device="cuda"`` -- the device memory the runner needs;
* on CPU: the peak RSS above the RSS before the run (a thread samples /proc/self/statm every 0.5 ms),
  minus the statistics it returns and the host copies of hidden states (both documented, expected to
  stay) -- the runner's working memory.

The claim to check: the working memory is about one layer plus one batch of activations, whatever the
depth; only the returned statistics grow with the number of layers.

    PYTHONPATH=python python benchmarks/bench_calibration_memory.py [--device cuda] [--layers 4,8,16,32]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

HIDDEN, INTER, HEADS, VOCAB = 256, 688, 4, 512


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(layers: int, device: str, samples: int, seq_len: int, batch: int) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from calibra.calib import LayerRunner

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=HEADS,
        max_position_embeddings=seq_len,
    )
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, VOCAB, (samples, seq_len))
    mask = torch.ones_like(ids, dtype=torch.bool)
    layer_bytes = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    out = {"layers": layers, "layer_MiB": layer_bytes / 2**20, "model_MiB": model_bytes / 2**20}
    runner = LayerRunner(model, device=device, observers=("hessian",), progress=False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        st = runner.run(ids, mask, batch_size=batch)
        torch.cuda.synchronize()
        out["device_peak_MiB"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak, stop = [0], [False]

        def sample():
            while not stop[0]:
                peak[0] = max(peak[0], _rss())
                time.sleep(0.0005)

        before = _rss()
        th = threading.Thread(target=sample, daemon=True)
        th.start()
        st = runner.run(ids, mask, batch_size=batch)
        stop[0] = True
        th.join()
        stats_bytes = sum(t.numel() * t.element_size() for t in st.tensors.values())
        hidden_bytes = 2 * samples * seq_len * HIDDEN * 4
        out.update(
            peak_above_start_MiB=(peak[0] - before) / 2**20,
            stats_MiB=stats_bytes / 2**20,
            hidden_states_MiB=hidden_bytes / 2**20,
            working_MiB=(peak[0] - before - stats_bytes - hidden_bytes) / 2**20,
        )
    out["seconds"] = round(runner.seconds, 2)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--layers", default="4,8,16,32")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one is not None:
        print(json.dumps(measure(a.one, a.device, a.samples, a.seq_len, a.batch_size)))
        return 0
    rows = []
    for n in [int(x) for x in a.layers.split(",")]:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            str(n),
            "--device",
            a.device,
            "--samples",
            str(a.samples),
            "--seq-len",
            str(a.seq_len),
            "--batch-size",
            str(a.batch_size),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    keys = [k for k in rows[0] if k != "layers"]
    print(
        f"runner peak memory, Llama hidden {HIDDEN}, {a.samples} samples x {a.seq_len} tokens, batch "
        f"{a.batch_size}, device {a.device}"
    )
    print("| layers | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for r in rows:
        print(f"| {r['layers']} | " + " | ".join(f"{r[k]:.2f}" for k in keys) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
