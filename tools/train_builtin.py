#!/usr/bin/env python
"""Build calibra's bundled assets: the built-in text sets, a byte-level BPE tokenizer, and the two
tiny models ``tiny-llama`` and ``tiny-moe``, all from text that every Python installation carries:
its own standard library (found through ``sysconfig``).

    python tools/train_builtin.py                      # texts + tokenizer + both models
    python tools/train_builtin.py --models tiny-llama  # texts + tokenizer + one model
    python tools/train_builtin.py --texts-only         # texts (and tokenizer) only

Everything is written under ``python/calibra/assets/`` (``--out`` to change), so it ships in the
wheel. Deterministic for a seed on a given Python version (the corpus is that version's stdlib,
recorded in each model's ``training.json``), torch build and thread count; runs on CPU
(``--threads``, 1 by default): 800 steps, ~15 minutes per model on a free core, 30-40 on a busy
2-core machine (see ``training.json``). The two models
train independently, so on two cores run them side by side:

    python tools/train_builtin.py --models tiny-llama &
    sleep 30; python tools/train_builtin.py --models tiny-moe

Corpus and splits
-----------------
Documents: every ``.py`` file of the stdlib (its source, and separately its docstrings), every
text file (``*.txt``, ``*.rst``, ``README*``, ``LICENSE*``), and every topic of
``pydoc_data/topics.py`` (the language reference as prose) as its own document. Test suites,
``site-packages``, bundled wheels and caches are left out (many distributions do not ship them).
Each document has a stable id (its path relative to the stdlib, ``::topic`` for pydoc topics);
``sha256(id)`` puts it in ``eval`` (bucket < 6 of 100), ``calibration`` (6..11) or ``train`` (the
rest), so the three splits are disjoint by construction; source and docstrings of one file share
the file's id and therefore its split. The calibration split is written as ``text/code.jsonl``
(``builtin:code``); the default calibration set, ``text/mixed.jsonl``, is built from it and other text
by ``tools/build_builtin_text.py``.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import platform
import random
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "python"))

SEED = 0
VOCAB_SIZE = 4096
EOS = "<|endoftext|>"
SEQ_LEN = 256
EVAL_BUCKETS = range(0, 6)
CALIB_BUCKETS = range(6, 12)
CALIB_CHARS = 700_000  # size caps of the shipped text sets
EVAL_CHARS = 500_000
RECORD_CHARS = 2_000  # one record of a shipped text set is at most about this long
TEST_SLICE_WINDOWS = 24  # the tests re-measure perplexity on the first windows of the eval text
CODE_PROMPT = "def read_config(path):\n"

SKIP_DIRS = {
    "site-packages",
    "dist-packages",
    "__pycache__",
    "test",
    "tests",
    "idle_test",
    "lib-dynload",
    "_bundled",
    "Icons",
    "__phello__",
}
TEXT_SUFFIXES = {".txt", ".rst"}

MODELS = {
    "tiny-llama": dict(
        arch="llama",
        config=dict(
            vocab_size=VOCAB_SIZE,
            hidden_size=256,
            intermediate_size=768,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            hidden_act="silu",
            max_position_embeddings=256,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            tie_word_embeddings=False,
            attention_bias=False,
            mlp_bias=False,
            initializer_range=0.02,
        ),
        steps=800,
        batch=16,
        lr=3e-3,
        warmup=60,
        weight_decay=0.1,
    ),
    "tiny-moe": dict(
        arch="mixtral",
        config=dict(
            vocab_size=VOCAB_SIZE,
            hidden_size=256,
            intermediate_size=256,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=64,
            hidden_act="silu",
            max_position_embeddings=256,
            rms_norm_eps=1e-5,
            rope_theta=10000.0,
            tie_word_embeddings=False,
            num_local_experts=8,
            num_experts_per_tok=2,
            router_aux_loss_coef=0.01,
            router_jitter_noise=0.0,
            output_router_logits=False,
            initializer_range=0.02,
            sliding_window=None,
        ),
        steps=800,
        batch=16,
        lr=3e-3,
        warmup=60,
        weight_decay=0.1,
    ),
}


# ----------------------------------------------------------------------------------------- corpus
def bucket(doc_id: str) -> int:
    return int(hashlib.sha256(doc_id.encode()).hexdigest()[:8], 16) % 100


def split_of(doc_id: str) -> str:
    b = bucket(doc_id)
    if b in EVAL_BUCKETS:
        return "eval"
    if b in CALIB_BUCKETS:
        return "calibration"
    return "train"


def _read(path: Path) -> str | None:
    try:
        text = path.read_bytes().decode("utf-8")
    except (UnicodeDecodeError, OSError):
        return None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _docstrings(source: str) -> str:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= 40:
                parts.append(doc.strip())
    return "\n\n".join(parts)


def _pydoc_topics(source: str) -> dict[str, str] | None:
    try:
        tree = ast.parse(source)
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in node.targets):
                topics = ast.literal_eval(node.value)
                if isinstance(topics, dict):
                    return {str(k): str(v) for k, v in topics.items()}
    except (SyntaxError, ValueError):
        pass
    return None


def collect_corpus(stdlib: Path) -> list[dict]:
    """Documents ``{"id", "kind", "text", "split"}`` in a deterministic order."""
    docs = []
    files = []
    for root, dirs, names in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("config-"))
        for name in names:
            files.append(Path(root) / name)
    for path in sorted(files, key=lambda p: p.relative_to(stdlib).as_posix()):
        rel = path.relative_to(stdlib).as_posix()
        name = path.name
        if rel == "pydoc_data/topics.py":
            text = _read(path)
            topics = _pydoc_topics(text or "")
            if topics:
                for key in sorted(topics):
                    doc_id = f"{rel}::{key}"
                    docs.append(dict(id=doc_id, kind="prose", text=topics[key].strip(), split=split_of(doc_id)))
                continue
        if path.suffix == ".py":
            text = _read(path)
            if not text or not text.strip():
                continue
            docs.append(dict(id=rel, kind="code", text=text, split=split_of(rel)))
            doc = _docstrings(text)
            if doc:
                docs.append(dict(id=rel, kind="docstring", text=doc, split=split_of(rel)))
        elif path.suffix in TEXT_SUFFIXES or name.startswith(("README", "LICENSE")):
            text = _read(path)
            if text and text.strip():
                docs.append(dict(id=rel, kind="prose", text=text.strip(), split=split_of(rel)))
    return docs


def _chunks(text: str, limit: int = RECORD_CHARS):
    """Pieces of ``text`` of at most about ``limit`` characters, cut at blank lines, else at lines."""
    piece: list[str] = []
    size = 0
    for block in text.split("\n\n"):
        lines = block.split("\n") if len(block) > limit else [block]
        sep = "\n" if len(lines) > 1 else "\n\n"
        for line in lines:
            line = line[:limit]
            if size and size + len(line) > limit:
                yield "\n".join(piece) if sep == "\n" else "\n\n".join(piece)
                piece, size = [], 0
            piece.append(line)
            size += len(line) + 1
        if sep == "\n" and piece:
            yield "\n".join(piece)
            piece, size = [], 0
    if piece:
        yield "\n\n".join(piece)


def text_set(docs: list[dict], split: str, cap: int) -> list[dict]:
    """Records ``{"text", "source", "kind"}`` of one split: chunks taken round-robin over the kinds
    (code / docstring / prose), documents in hash order, until ``cap`` characters."""
    per_kind: dict[str, list[dict]] = {}
    for d in sorted(
        (d for d in docs if d["split"] == split),
        key=lambda d: (hashlib.sha256(d["id"].encode()).hexdigest(), d["kind"]),
    ):
        for i, chunk in enumerate(_chunks(d["text"])):
            if len(chunk.strip()) >= 200:
                per_kind.setdefault(d["kind"], []).append(
                    dict(text=chunk.strip() + "\n", source=f"stdlib:{d['id']}#{i}", kind=d["kind"])
                )
    out, total = [], 0
    queues = [per_kind[k] for k in sorted(per_kind)]
    pos = [0] * len(queues)
    while total < cap and any(p < len(q) for p, q in zip(pos, queues)):
        for qi, q in enumerate(queues):
            if pos[qi] < len(q) and total < cap:
                rec = q[pos[qi]]
                pos[qi] += 1
                out.append(rec)
                total += len(rec["text"])
    return out


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


# -------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(train_texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(train_texts, trainer=trainer, length=len(train_texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        model_max_length=256,
        clean_up_tokenization_spaces=False,
    )


def portable_tokenizer_config(folder: Path) -> None:
    """transformers 5 writes ``"tokenizer_class": "TokenizersBackend"``, which transformers 4 does not
    know; ``PreTrainedTokenizerFast`` means the same tokenizer.json-backed class to both."""
    path = folder / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# -------------------------------------------------------------------------------------- training
def build_model(name: str, seed: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

    spec = MODELS[name]
    cfg_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "mixtral": (MixtralConfig, MixtralForCausalLM)}[
        spec["arch"]
    ]
    cfg = cfg_cls(bos_token_id=0, eos_token_id=0, pad_token_id=0, **spec["config"])
    torch.manual_seed(seed)
    model = model_cls._from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    return model


def lr_at(step: int, spec: dict) -> float:
    if step < spec["warmup"]:
        return spec["lr"] * (step + 1) / spec["warmup"]
    t = (step - spec["warmup"]) / max(1, spec["steps"] - spec["warmup"])
    return spec["lr"] * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train_model(name: str, tokenizer, train_ids, calib_texts, eval_texts, out_dir: Path, args, corpus_facts):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig

    from calibra.assets._metrics import expert_usage, perplexity

    spec = dict(MODELS[name])
    if args.steps:
        spec["steps"] = args.steps
    log = lambda msg: print(f"[{name}] {msg}", flush=True)  # noqa: E731
    model = build_model(name, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"{n_params} parameters; measuring the untrained model")
    t0 = time.time()
    ppl_untrained = perplexity(model, tokenizer, eval_texts)
    ppl_untrained_slice = perplexity(model, tokenizer, eval_texts, max_windows=TEST_SLICE_WINDOWS)
    log(f"untrained eval ppl {ppl_untrained:.1f} ({time.time() - t0:.0f}s)")

    is_moe = spec["arch"] == "mixtral"
    decay, no_decay = [], []
    for pname, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in pname else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec["lr"],
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    gen = torch.Generator().manual_seed(args.seed + 1)
    n_tok = train_ids.numel()
    model.train()
    t_train = time.time()
    losses = []
    for step in range(spec["steps"]):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, spec)
        starts = torch.randint(0, n_tok - SEQ_LEN - 1, (spec["batch"],), generator=gen)
        batch = torch.stack([train_ids[s : s + SEQ_LEN] for s in starts.tolist()]).long()
        kw = {"output_router_logits": True} if is_moe else {}
        out = model(input_ids=batch, labels=batch, **kw)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(out.loss.item())
        if step % 50 == 0 or step == spec["steps"] - 1:
            aux = f" aux {out.aux_loss.item():.3f}" if is_moe else ""
            log(
                f"step {step} loss {sum(losses[-50:]) / len(losses[-50:]):.3f}{aux} "
                f"lr {lr_at(step, spec):.2e} {time.time() - t_train:.0f}s"
            )
    train_seconds = time.time() - t_train

    # Save in bfloat16 (half the bytes, exactly what is shipped), then reload and compare.
    model.eval()
    probe = torch.tensor([tokenizer.encode(CODE_PROMPT * 4)[:64]])
    with torch.no_grad():
        for p in model.parameters():  # round to what is stored; reference logits in float32
            p.copy_(p.to(torch.bfloat16).float())
        ref_logits = model(input_ids=probe).logits
    model.to(torch.bfloat16)
    model.config.use_cache = True
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.iterdir():
        old.unlink()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    portable_tokenizer_config(out_dir)
    GenerationConfig(
        bos_token_id=0, eos_token_id=0, pad_token_id=0, do_sample=False, max_new_tokens=64
    ).save_pretrained(out_dir)
    del model
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    with torch.no_grad():
        diff = (ref_logits - reloaded(input_ids=probe).logits).abs().max().item()
    log(f"reload max |logit diff| {diff:.3g}")
    if diff != 0.0:
        raise SystemExit(f"[{name}] reloaded model differs from the trained one (max diff {diff})")

    ppl = perplexity(reloaded, tokenizer, eval_texts)
    ppl_slice = perplexity(reloaded, tokenizer, eval_texts, max_windows=TEST_SLICE_WINDOWS)
    log(f"eval ppl {ppl:.2f} (untrained {ppl_untrained:.1f}); test slice {ppl_slice:.2f}")
    prompt_ids = tokenizer(CODE_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        gen_ids = reloaded.generate(prompt_ids, max_new_tokens=64, do_sample=False)
    sample = tokenizer.decode(gen_ids[0], skip_special_tokens=False)
    log("greedy sample:\n" + sample)

    facts = {
        "name": name,
        "architecture": {
            "model_type": reloaded.config.model_type,
            "class": type(reloaded).__name__,
            **{k: v for k, v in spec["config"].items()},
            "notes": (
                "grouped-query attention (4 query heads, 2 key/value heads), RoPE, SwiGLU MLP, RMSNorm, untied lm_head"
                if not is_moe
                else "Mixtral sparse MoE: 8 experts, top-2 routing, SwiGLU experts (stored fused as 3-D "
                "gate_up_proj/down_proj parameters), GQA (4/2 heads), RoPE, RMSNorm, untied lm_head"
            ),
        },
        "parameters": n_params,
        "parameters_non_embedding": n_params
        - sum(p.numel() for n, p in reloaded.named_parameters() if "embed_tokens" in n or "lm_head" in n),
        "stored_dtype": "bfloat16",
        "training": {
            "seed": args.seed,
            "steps": spec["steps"],
            "batch_size": spec["batch"],
            "seq_len": SEQ_LEN,
            "tokens_seen": spec["steps"] * spec["batch"] * SEQ_LEN,
            "train_tokens_available": int(n_tok),
            "optimizer": f"AdamW(betas=(0.9, 0.95), weight_decay={spec['weight_decay']}, no decay on norms), "
            f"grad clip 1.0",
            "schedule": f"linear warmup {spec['warmup']} steps to lr {spec['lr']}, cosine decay to 10%",
            "router_aux_loss_coef": spec["config"].get("router_aux_loss_coef") if is_moe else None,
            "precision": "float32 training, saved as bfloat16",
            "wall_seconds": round(train_seconds, 1),
            "final_train_loss_last50": round(sum(losses[-50:]) / len(losses[-50:]), 4),
        },
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "versions": {
            "python_of_corpus": corpus_facts["python_version"],
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": __import__("tokenizers").__version__,
        },
        "corpus": corpus_facts,
        "eval": {
            "protocol": (
                f"calibra.assets._metrics.perplexity: builtin eval texts (text/eval.jsonl), each encoded "
                f"without special tokens + one end-of-text token, concatenated, non-overlapping "
                f"windows of {SEQ_LEN} tokens (tail dropped), exp(mean NLL over the {SEQ_LEN - 1} "
                f"predicted positions per window), float32 weights upcast from the stored bfloat16"
            ),
            "heldout_ppl": round(ppl, 3),
            "heldout_ppl_untrained": round(ppl_untrained, 3),
            "heldout_ppl_first_windows": {
                "windows": TEST_SLICE_WINDOWS,
                "trained": round(ppl_slice, 3),
                "untrained": round(ppl_untrained_slice, 3),
            },
        },
        "greedy_sample": {"prompt": CODE_PROMPT, "max_new_tokens": 64, "text": sample},
    }
    if is_moe:
        counts, first = expert_usage(reloaded, tokenizer, calib_texts, first_windows=True)
        facts["expert_usage_calibration"] = {
            "what": "per layer, how many times each expert is among the router's top-2, over all builtin "
            f"calibration texts in non-overlapping windows of {SEQ_LEN} tokens",
            "counts": counts,
            "fractions": [[round(c / sum(row), 4) for c in row] for row in counts],
            "unused_experts": [[e for e, c in enumerate(row) if c == 0] for row in counts],
            "first_window": first,
        }
        for li, row in enumerate(counts):
            log(f"layer {li} expert usage: " + " ".join(f"{c / sum(row):.3f}" for c in row))
    (out_dir / "training.json").write_text(json.dumps(facts, indent=2, ensure_ascii=False) + "\n")
    log(f"wrote {out_dir} ({sum(f.stat().st_size for f in out_dir.iterdir()) / 1e6:.1f} MB)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--texts-only", action="store_true", help="write the text sets and stop")
    ap.add_argument("--steps", type=int, default=0, help="override the training steps (for quick trials)")
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1 by default: on a busy 2-core machine, two 1-thread runs side by side beat one "
        "2-thread run)",
    )
    ap.add_argument("--out", type=Path, default=REPO / "python" / "calibra" / "assets")
    args = ap.parse_args(argv)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    import torch

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    random.seed(args.seed)

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    t0 = time.time()
    docs = collect_corpus(stdlib)
    by_split = {s: [d for d in docs if d["split"] == s] for s in ("train", "calibration", "eval")}
    for s, ds in by_split.items():
        print(f"[corpus] {s}: {len(ds)} documents, {sum(len(d['text']) for d in ds) / 1e6:.2f} M chars")
    calib = text_set(docs, "calibration", CALIB_CHARS)
    evals = text_set(docs, "eval", EVAL_CHARS)
    # builtin:code; the default calibration set (mixed.jsonl) copies a share of it: rerun
    # tools/build_builtin_text.py after this
    write_jsonl(args.out / "text" / "code.jsonl", calib)
    write_jsonl(args.out / "text" / "eval.jsonl", evals)
    print(f"[texts] calibration {len(calib)} records, eval {len(evals)} records ({time.time() - t0:.0f}s)")

    train_texts = [d["text"] for d in by_split["train"] if d["kind"] != "docstring"]  # docstrings are in the code
    tokenizer = train_tokenizer(train_texts)
    enc = tokenizer.backend_tokenizer.encode_batch(train_texts, add_special_tokens=False)
    ids = []
    for e in enc:
        ids.extend(e.ids)
        ids.append(tokenizer.eos_token_id)
    train_ids = torch.tensor(ids, dtype=torch.int32)
    print(
        f"[tokenizer] vocab {len(tokenizer)}; {len(ids)} train tokens "
        f"({sum(map(len, train_texts)) / len(ids):.2f} chars/token) ({time.time() - t0:.0f}s)"
    )
    if args.texts_only:
        return
    corpus_facts = {
        "source": "the Python standard library (sysconfig.get_paths()['stdlib']), test suites excluded",
        "python_version": platform.python_version(),
        "documents": {s: len(ds) for s, ds in by_split.items()},
        "chars": {s: sum(len(d["text"]) for d in ds) for s, ds in by_split.items()},
        "train_tokens": len(ids),
        "split": "sha256(document id) % 100: eval < 6, calibration 6..11, train otherwise",
        "tokenizer": f"byte-level BPE, vocab {VOCAB_SIZE}, trained on the train split with tokenizers",
        "shipped_texts": {
            "calibration_records": len(calib),
            "calibration_chars": sum(len(r["text"]) for r in calib),
            "eval_records": len(evals),
            "eval_chars": sum(len(r["text"]) for r in evals),
        },
    }
    calib_texts = [r["text"] for r in calib]
    eval_texts = [r["text"] for r in evals]
    for name in args.models:
        train_model(name, tokenizer, train_ids, calib_texts, eval_texts, args.out / "models" / name, args, corpus_facts)


if __name__ == "__main__":
    main()
