#!/usr/bin/env python
"""Rebuild the mixed-domain built-in text sets from their sources (stdlib only, deterministic).

    python tools/build_builtin_text.py            # writes python/calibra/assets/text/{mixed,eval_prose}.jsonl
                                                  # and python/calibra/assets/text/MANIFEST.json

Sources:

* ``tools/builtin_text/calib_*.txt`` and ``eval_prose_*.txt``: text written for calibra by its authors
  (stories, dialogue, chats and instructions, technical writing, worked mathematics; English, German,
  French, Spanish, Chinese), released with calibra under its Apache-2.0 licence. Each document starts with
  a header line ``=== <id> | <domain> | <lang>``; a ``chat`` document holds ``<system>``/``<user>``/
  ``<assistant>`` lines, each opening one message.
* ``tools/builtin_text/calib_pydocs.txt``: prose sections of the Python documentation (PSF License 2.0,
  which covers Python "and its associated documentation"), taken from the reST sources that Debian's
  ``python3.11-doc`` package ships (``/usr/share/doc/python3.11/html/_sources``), code examples kept.
  Re-extract with ``--import-python-docs DIR`` (the ``_sources`` folder); PYDOCS lists the pages.
* ``python/calibra/assets/text/code.jsonl``: the Python standard library set (PSF License), of which
  a fixed share (records in the order of a hash of their source, up to CODE_BYTES) is copied into the mixed set so
  the default calibration still sees code.

``mixed.jsonl`` (``builtin``/``builtin:calibration``) takes the ``calib_*`` documents and the code share;
``eval_prose.jsonl`` (``builtin:eval-prose``) takes the ``eval_prose_*`` documents. The two share no
document (a test checks that no paragraph of one appears in the other).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import textwrap
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "tools" / "builtin_text"
TEXT = REPO / "python" / "calibra" / "assets" / "text"
DOMAINS = ("narrative", "dialogue", "chat", "instruction", "technical", "essay", "math")
LANGS = ("en", "de", "fr", "es", "zh")
ROLES = ("system", "user", "assistant")
# The stdlib records copied into the mixed set: in the order of a hash of their source, until this many
# bytes (about a third of the mixed set: the default must not cost code models anything; docs/calibration.md).
CODE_BYTES = 112 * 1024
AUTHORED = {
    "source": "written for calibra by its authors (tools/builtin_text/)",
    "licence": "Apache-2.0 (calibra's own licence)",
}
PYTHON_DOCS = {
    "source": "Python 3.11 documentation, reST sources from Debian's python3.11-doc package "
    "(tools/builtin_text/calib_pydocs.txt)",
    "licence": "PSF-2.0 (Python Software Foundation License, covering Python and its documentation)",
}
# Prose-heavy pages of the Python documentation (the FAQ, HOWTOs and tutorial chapters that explain rather
# than list), in this order, until PYDOCS_BYTES.
PYDOCS = (
    "faq/general",
    "faq/design",
    "howto/sockets",
    "tutorial/floatingpoint",
    "tutorial/appetite",
    "howto/unicode",
    "tutorial/whatnow",
)
PYDOCS_BYTES = 72 * 1024
STDLIB = {
    "source": "CPython standard library source and docstrings (the builtin:code set, tools/train_builtin.py)",
    "licence": "PSF-2.0 (Python Software Foundation License)",
}


def parse_documents(path: Path) -> list[dict]:
    """The documents of one source file: ``{id, domain, lang, text}`` (chat: also ``messages``)."""
    docs, head, lines = [], None, []

    def close():
        if head is None:
            return
        text = "\n".join(lines).strip("\n")
        doc_id, domain, lang = (s.strip() for s in head.split("|"))
        if domain not in DOMAINS or lang not in LANGS:
            raise ValueError(f"{path.name}: document {doc_id!r} has domain {domain!r} / lang {lang!r}")
        doc = {"id": doc_id, "domain": domain, "lang": lang}
        if domain == "chat":
            doc["messages"] = parse_chat(text, f"{path.name}:{doc_id}")
        else:
            doc["text"] = text
        docs.append(doc)

    for line in path.read_text(encoding="utf-8").split("\n"):
        if line.startswith("=== "):
            close()
            head, lines = line[4:], []
        elif head is not None:
            lines.append(line)
    close()
    return docs


def parse_chat(text: str, where: str) -> list[dict]:
    messages = []
    for line in text.split("\n"):
        tag = line.strip()
        if tag.startswith("<") and tag.endswith(">") and tag[1:-1] in ROLES:
            messages.append({"role": tag[1:-1], "content": []})
        elif messages:
            messages[-1]["content"].append(line)
        elif line.strip():
            raise ValueError(f"{where}: text before the first <role> line")
    if not messages:
        raise ValueError(f"{where}: a chat document needs <user>/<assistant> lines")
    return [{"role": m["role"], "content": "\n".join(m["content"]).strip("\n")} for m in messages]


def _order(source: str) -> str:
    return hashlib.sha256(b"mixed:" + source.encode()).hexdigest()


def record_bytes(r: dict) -> int:
    if "messages" in r:
        return sum(len(m["content"].encode()) for m in r["messages"])
    return len(r["text"].encode())


def authored_records(prefix: str) -> list[dict]:
    out = []
    for path in sorted(SRC.glob(f"{prefix}*.txt")):
        for doc in parse_documents(path):
            r = {k: doc[k] for k in ("text", "messages") if k in doc}
            origin = "python-docs" if path.name == "calib_pydocs.txt" else f"calibra:{path.name}"
            r.update(source=f"{origin}::{doc['id']}", kind=doc["domain"], lang=doc["lang"])
            out.append(r)
    return out


def code_share() -> list[dict]:
    with open(TEXT / "code.jsonl", encoding="utf-8") as f:
        code = [json.loads(line) for line in f if line.strip()]
    picked, total = [], 0
    for r in sorted(code, key=lambda r: _order(r["source"])):
        if total >= CODE_BYTES:
            break
        picked.append(dict(r, lang="code" if r["kind"] == "code" else "en"))
        total += record_bytes(r)
    return picked


def summary(records: list[dict]) -> dict:
    kinds, langs, origin = Counter(), Counter(), Counter()
    for r in records:
        n = record_bytes(r)
        kinds[r["kind"]] += n
        langs[r["lang"]] += n
        origin[r["source"].split(":", 1)[0].replace("calibra", "authored")] += n
    return {
        "records": len(records),
        "bytes": sum(record_bytes(r) for r in records),
        "bytes_by_kind": dict(sorted(kinds.items())),
        "bytes_by_language": dict(sorted(langs.items())),
        "bytes_by_source": dict(sorted(origin.items())),
    }


# ------------------------------------------------------------------------------- Python docs import
_ROLE = re.compile(r":[\w:.-]+:`~?([^`<]*?)\s*(?:<[^>]*>)?`")
_LINK = re.compile(r"`([^`<]+?)\s*<[^>]*>`_+")
_PROSE_DIRECTIVES = ("note", "warning", "tip", "seealso", "important")


def rst_prose(text: str) -> list[tuple[str, str]]:
    """``[(section title, text)]`` of one reST page: directives and tables dropped, literal blocks kept
    verbatim, roles and links reduced to their text, each prose paragraph joined into one line."""
    lines = text.replace("\r\n", "\n").split("\n")
    sections, title, paras, para = [], "intro", [], []
    skip_indent = None  # inside a dropped block: skip lines indented more than this

    def flush_para():
        if para:  # roles and links may wrap across lines: clean the joined paragraph
            paras.append(_LINK.sub(r"\1", _ROLE.sub(r"\1", " ".join(para))).replace("``", ""))
            para.clear()

    def flush_section():
        flush_para()
        body = "\n\n".join(paras)
        if body:
            sections.append((title, body))
        paras.clear()

    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if skip_indent is not None:
            if not stripped or indent > skip_indent:
                i += 1
                continue
            skip_indent = None
        if i + 1 < len(lines) and stripped and re.fullmatch(r"([=\-~^*#\"'+])\1{2,}", lines[i + 1].strip()):
            flush_section()
            title = stripped
            i += 2
            continue
        if re.fullmatch(r"([=\-~^*#\"'+])\1{2,}", stripped):
            i += 1
            continue
        if stripped.startswith(".. ") and not stripped.startswith(".. code-block::"):
            flush_para()
            name = stripped[3:].split("::", 1)[0].strip()
            if name in _PROSE_DIRECTIVES:
                rest = stripped.split("::", 1)[1].strip() if "::" in stripped else ""
                if rest:
                    para.append(rest)
            else:
                skip_indent = indent
            i += 1
            continue
        if stripped.startswith(("+--", "|", ">>>", "...")) or stripped.startswith("=="):
            flush_para()
            i += 1
            continue
        if not stripped:
            flush_para()
            i += 1
            continue
        if stripped.endswith("::") or stripped.startswith(".. code-block::"):
            if not stripped.startswith(".."):
                para.append(stripped[:-1].rstrip(":") + (":" if stripped != "::" else ""))
            flush_para()
            i += 1
            block = []  # the literal block: kept verbatim (dedented), the example the prose refers to
            while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > indent):
                block.append(lines[i])
                i += 1
            code = textwrap.dedent("\n".join(block)).strip("\n")
            if code and not code.lstrip().startswith(":"):
                paras.append(code)
            continue
        para.append(re.sub(r"^[*-] ", "- ", stripped))
        i += 1
    flush_section()
    return sections


def import_python_docs(sources: Path) -> None:
    out, total = [], 0
    for page in PYDOCS:
        text = (sources / f"{page}.rst.txt").read_text(encoding="utf-8")
        for n, (title, body) in enumerate(rst_prose(text)):
            if total >= PYDOCS_BYTES:
                break
            if len(body) < 400:
                continue
            out.append(f"=== {page}#{n} | technical | en\n{title}\n\n{body}\n")
            total += len(body.encode())
    (SRC / "calib_pydocs.txt").write_text("\n".join(out), encoding="utf-8")
    print(f"calib_pydocs.txt: {len(out)} sections, {total / 1024:.1f} KiB")


def write_jsonl(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--import-python-docs", type=Path, default=None, help="re-extract calib_pydocs.txt first")
    args = ap.parse_args(argv)
    if args.import_python_docs is not None:
        import_python_docs(args.import_python_docs)
    mixed = authored_records("calib_") + code_share()
    evals = authored_records("eval_prose_")
    write_jsonl(TEXT / "mixed.jsonl", mixed)
    write_jsonl(TEXT / "eval_prose.jsonl", evals)
    code = [json.loads(line) for line in (TEXT / "code.jsonl").read_text(encoding="utf-8").splitlines() if line]
    held = [json.loads(line) for line in (TEXT / "eval.jsonl").read_text(encoding="utf-8").splitlines() if line]
    manifest = {
        "about": "calibra's built-in text sets: what each holds, where it came from, under which licence. "
        "Rebuilt by tools/build_builtin_text.py (mixed, eval-prose) and tools/train_builtin.py (code, eval).",
        "sources": {"authored": AUTHORED, "python-docs": PYTHON_DOCS, "stdlib": STDLIB},
        "sets": {
            "calibration": dict(file="mixed.jsonl", role="default calibration (builtin, builtin:calibration)")
            | summary(mixed),
            "code": dict(file="code.jsonl", role="calibration before 0.x: Python stdlib only (builtin:code)")
            | summary([dict(r, lang="code" if r["kind"] == "code" else "en") for r in code]),
            "eval": dict(file="eval.jsonl", role="held-out evaluation, Python stdlib (builtin, builtin:eval)")
            | summary([dict(r, lang="code" if r["kind"] == "code" else "en") for r in held]),
            "eval-prose": dict(file="eval_prose.jsonl", role="held-out English prose evaluation (builtin:eval-prose)")
            | summary(evals),
        },
    }
    (TEXT / "MANIFEST.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    for name, s in manifest["sets"].items():
        print(f"{name:10s} {s['records']:4d} records {s['bytes'] / 1024:7.1f} KiB  {s['bytes_by_kind']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
