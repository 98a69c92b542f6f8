#!/usr/bin/env python
"""Print the README rows for the built-in models from their training.json (markdown).

python tools/builtin_report.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

from calibra.assets import BUILTIN_MODELS, training_facts  # noqa: E402


def main() -> None:
    print(
        "| model | architecture | parameters | tokens seen | training time | held-out ppl (trained) "
        "| held-out ppl (untrained) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    facts = {name: training_facts(name) for name in BUILTIN_MODELS}
    for name, f in facts.items():
        a, t, e = f["architecture"], f["training"], f["eval"]
        arch = (
            f"{a['model_type']}, {a['num_hidden_layers']} layers, hidden {a['hidden_size']}, "
            f"intermediate {a['intermediate_size']}, heads {a['num_attention_heads']}/{a['num_key_value_heads']}"
        )
        if "num_local_experts" in a:
            arch += f", {a['num_local_experts']} experts top-{a['num_experts_per_tok']}"
        print(
            f"| `builtin:{name}` | {arch} | {f['parameters'] / 1e6:.2f}M | {t['tokens_seen'] / 1e6:.2f}M "
            f"| {t['wall_seconds'] / 60:.1f} min ({f['machine']['torch_threads']} thread) "
            f"| {e['heldout_ppl']:.2f} | {e['heldout_ppl_untrained']:.0f} |"
        )
    moe = facts.get("tiny-moe", {}).get("expert_usage_calibration")
    if moe:
        print("\nExpert usage of tiny-moe on the built-in calibration text (share of top-2 slots):\n")
        print("| layer | " + " | ".join(f"e{i}" for i in range(len(moe["fractions"][0]))) + " |")
        print("|---|" + "---:|" * len(moe["fractions"][0]))
        for li, row in enumerate(moe["fractions"]):
            print(f"| {li} | " + " | ".join(f"{100 * x:.1f}%" for x in row) + " |")
        print("\n```")
        for li, row in enumerate(moe["fractions"]):
            print(f"layer {li}")
            for i, x in enumerate(row):
                print(f"  e{i} {'#' * max(1, round(100 * x)) if x else ''} {100 * x:.1f}%")
        print("```")
    for name, f in facts.items():
        s = f["greedy_sample"]
        print(f"\nGreedy sample, `builtin:{name}`, prompt {s['prompt']!r}:\n\n```python\n{s['text']}\n```")


if __name__ == "__main__":
    main()
