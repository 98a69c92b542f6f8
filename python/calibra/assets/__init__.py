"""calibra's bundled assets: two tiny trained models and two small text sets.

Everything here ships inside the wheel and needs no network, so every command, test and
benchmark can run on a machine that cannot reach a model hub.

Models (Hugging Face folders, loadable with ``AutoModelForCausalLM.from_pretrained``)::

    builtin:tiny-llama   dense Llama (GQA, RoPE, SwiGLU, RMSNorm, untied lm_head), ~5.2M params
    builtin:tiny-moe     Mixtral sparse MoE, 8 experts, top-2, ~7.4M params

Both are stored in bfloat16 (``"dtype": "bfloat16"`` in config.json); pass
``dtype=torch.float32`` to ``from_pretrained`` to compute in float32. Each folder holds
``config.json``, ``model.safetensors``, ``generation_config.json``, ``tokenizer.json`` +
``tokenizer_config.json`` (byte-level BPE, 4096 tokens, ``<|endoftext|>`` = id 0 is bos/eos/pad)
and ``training.json`` (how it was trained and what it measures: parameters, wall time,
held-out perplexity trained vs untrained, and for tiny-moe the expert-usage histogram).

Texts, in ``text/`` (named ``builtin:NAME`` wherever a calibration or evaluation text is asked for;
plain ``builtin`` is ``builtin:calibration`` for calibration and ``builtin:eval`` for evaluation)::

    builtin:calibration  mixed.jsonl       the default calibration set: English stories, dialogue, chats and
                                           instructions, technical writing, worked mathematics, German,
                                           French, Spanish and Chinese text, and a share of builtin:code
    builtin:code         code.jsonl        Python standard-library source and docstrings (the default
                                           calibration set of calibra 0.1.0 and before)
    builtin:eval         eval.jsonl        held-out evaluation text, Python standard library
    builtin:eval-prose   eval_prose.jsonl  held-out English prose (stories and essays)

``MANIFEST.json`` next to them records each set's sources, licences and byte counts by kind and language
(``tools/build_builtin_text.py`` rebuilds the mixed and prose sets, ``tools/train_builtin.py`` the code and
eval sets). One JSON object per line: ``{"text": str, "source": str, "kind": str}`` or, for a chat,
``{"messages": [{"role", "content"}, ...], "source", "kind": "chat"}``; the authored records also carry
``"lang"``. The stdlib records' ``source`` is ``stdlib:<path relative to the stdlib>[::<pydoc topic>]#<chunk>``;
the training, code and eval documents are disjoint (split by a hash of the document's path, see
``tools/train_builtin.py``), and no document of the mixed set is in either eval set.

This module is at the bottom of calibra's import graph: it imports nothing from calibra and
neither torch nor transformers.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

__all__ = [
    "BUILTIN_MODELS",
    "BUILTIN_TEXTS",
    "BUILTIN_PREFIX",
    "ASSETS_DIR",
    "is_builtin",
    "resolve_model",
    "builtin_texts",
    "builtin_records",
    "text_set_name",
    "plain_chat",
    "resolve_texts",
    "training_facts",
    "load_model",
]

ASSETS_DIR = Path(__file__).resolve().parent
BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS: dict[str, str] = {
    "tiny-llama": "dense Llama-architecture causal LM (GQA, RoPE, SwiGLU, RMSNorm, untied lm_head)",
    "tiny-moe": "Mixtral-architecture sparse MoE causal LM (8 experts, top-2)",
}
BUILTIN_TEXTS: dict[str, str] = {
    "calibration": "mixed.jsonl",
    "code": "code.jsonl",
    "eval": "eval.jsonl",
    "eval-prose": "eval_prose.jsonl",
}


def _names() -> str:
    return ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS)


def is_builtin(spec) -> bool:
    """True for ``"builtin"`` (a text source) and ``"builtin:NAME"`` (a model), whatever NAME is."""
    return isinstance(spec, str) and (spec == "builtin" or spec.startswith(BUILTIN_PREFIX))


def resolve_model(spec) -> Path:
    """The folder of a model given as ``builtin:NAME`` or as a path to a local folder.

    Raises ``ValueError`` for an unknown built-in name (listing the known ones) and
    ``FileNotFoundError`` for a local path that is not a folder.
    """
    if isinstance(spec, str) and is_builtin(spec):
        name = spec[len(BUILTIN_PREFIX) :] if spec.startswith(BUILTIN_PREFIX) else ""
        if name not in BUILTIN_MODELS:
            raise ValueError(f"unknown built-in model {spec!r}; available: {_names()}")
        path = ASSETS_DIR / "models" / name
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"built-in model {spec!r} is missing from this installation ({path}); "
                "rebuild it with tools/train_builtin.py"
            )
        return path
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"model {str(spec)!r} is not a local folder; give a Hugging Face model folder or one of: {_names()}"
        )
    return path


def training_facts(name: str) -> dict:
    """The ``training.json`` of a built-in model (``"tiny-llama"`` or ``"builtin:tiny-llama"``)."""
    return json.loads(
        (resolve_model(name if is_builtin(name) else BUILTIN_PREFIX + name) / "training.json").read_text(
            encoding="utf-8"
        )
    )


def text_set_name(spec, default: str = "calibration") -> str:
    """The text set a ``builtin`` / ``builtin:NAME`` spec names (``default`` for plain ``builtin``).

    Raises ``ValueError`` listing the known sets for an unknown name.
    """
    name = default if spec == "builtin" else str(spec)[len(BUILTIN_PREFIX) :]
    if name not in BUILTIN_TEXTS:
        raise ValueError(
            f"unknown built-in text set {spec!r}; available: "
            + ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_TEXTS)
            + " (plain 'builtin' = builtin:calibration for calibration, builtin:eval for evaluation)"
        )
    return name


@cache
def _records(split: str) -> tuple:
    if split not in BUILTIN_TEXTS:
        raise ValueError(f"unknown built-in text split {split!r}; available: {', '.join(BUILTIN_TEXTS)}")
    path = ASSETS_DIR / "text" / BUILTIN_TEXTS[split]
    with open(path, encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f if line.strip())


def plain_chat(messages) -> str:
    """A chat as plain text (``User: ...`` paragraphs), for tokenizers without a chat template and for
    evaluation streams: the built-in models have no template, and a text set must still read as text."""
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def builtin_records(split: str) -> list[dict]:
    """The records (``text`` or ``messages``, ``source``, ``kind``) of a built-in text set."""
    return [dict(r) for r in _records(split)]


def builtin_texts(split: str) -> list[str]:
    """The texts of a built-in text set (``"calibration"``, ``"code"``, ``"eval"``, ``"eval-prose"``), in
    their fixed order; a chat record comes as :func:`plain_chat` text."""
    return [r["text"] if "text" in r else plain_chat(r["messages"]) for r in _records(split)]


def resolve_texts(source, split: str) -> list[str]:
    """Texts from a calibration/evaluation source: ``"builtin"`` (the built-in ``split``), ``"builtin:NAME"``
    (a named built-in set), a ``.jsonl`` file (``"text"`` of every line), a ``.txt`` file (one text), or a
    folder of those."""
    if is_builtin(source):
        return builtin_texts(text_set_name(source, split))
    path = Path(source).expanduser()
    if path.is_dir():
        return [
            t for p in sorted(path.iterdir()) if p.suffix in (".jsonl", ".txt") for t in resolve_texts(str(p), split)
        ]
    if not path.is_file():
        raise FileNotFoundError(
            f"text source {str(source)!r} is neither 'builtin', 'builtin:NAME' nor a file or folder"
        )
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            return [json.loads(line)["text"] for line in f if line.strip()]
    return [path.read_text(encoding="utf-8")]


def load_model(spec, dtype="float32", *, trust_remote_code: bool = False):
    """``(model, tokenizer)`` for ``builtin:NAME`` or a local folder, in eval mode, offline.

    ``dtype`` is a torch dtype or its name (``"float32"`` by default: the built-in models are
    stored in bfloat16 and computed in float32 unless asked otherwise; ``"auto"`` keeps the
    stored dtype). Imports torch and transformers on first use. No checks here: the verbs read models
    through ``calibra.io.load_model``, which validates the folder first and calls this.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(spec)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    remote = {"trust_remote_code": True} if trust_remote_code else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True, **remote)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, **remote)
    return model.eval(), tokenizer
