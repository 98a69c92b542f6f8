"""CalibrationDataset: the texts a calibration run reads, from wherever they come.

Sources:

* programmatic: ``CalibrationDataset(samples=["text", ...], name=..., version=...)``; a sample may
  also be a chat conversation (a list of ``{"role", "content"}`` dicts);
* ``CalibrationDataset.builtin(name)``: a text set shipped in :mod:`calibra.assets` (``"calibration"``, the
  mixed-domain default; ``"code"``, the Python-only set calibra calibrated on up to 0.1.0; ...);
* ``CalibrationDataset.from_local(path)``: ``.txt`` (samples separated by blank lines), ``.json``
  (an array of strings) or ``.jsonl`` (``{"text": ...}`` or ``{"messages": [...]}`` per line), or a
  folder of such files;
* ``CalibrationDataset.from_hub(name)``: c4, wikitext2, bartowski-v3, the-stack (see :mod:`.hub`);
* ``CalibrationDataset.from_source(spec)``: any of the above from one string (the config's
  ``dataset`` field: ``builtin``, ``builtin:NAME``, a path or a hub name).

Chat rows are kept as conversations until a tokenizer is known: they are rendered with that
tokenizer's chat template by :meth:`CalibrationDataset.texts`. The built-in set's chats also carry a
plain-text form, used when the tokenizer has no template (the built-in models have none), so the
default calibration runs on every model. Nothing here imports torch or transformers.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from calibra.data.hub import offline_alternatives

__all__ = ["CalibrationDataset", "ChatSample", "LOCAL_SUFFIXES", "source_kind"]

LOCAL_SUFFIXES = (".txt", ".json", ".jsonl")


@dataclass(frozen=True)
class ChatSample:
    """A conversation to be rendered with the tokenizer's chat template.

    ``messages`` is a tuple of ``{"role": str, "content": str}`` dicts; ``origin`` says where it came
    from (``"chats.jsonl:7"``), so a rendering error can name the file and line. ``plain``: the text to
    use when the tokenizer has no chat template (``None``: such a tokenizer is an error).
    """

    messages: tuple
    origin: str
    plain: str | None = None

    def to_json(self) -> list:
        return [dict(m) for m in self.messages]


def _check_messages(messages, origin: str) -> tuple:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError(
            f'[data] {origin}: "messages" must be a non-empty list of '
            f'{{"role": ..., "content": ...}} objects, got {type(messages).__name__}'
        )
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise ValueError(
                f'[data] {origin}: message {i} must be an object with "role" (a string) '
                f'and "content", got {json.dumps(m)[:80]}'
            )
    return tuple(dict(m) for m in messages)


def _as_sample(item, origin: str):
    """A programmatic or parsed item -> ``str`` or :class:`ChatSample` (the two sample kinds)."""
    if isinstance(item, str):
        return item
    if isinstance(item, ChatSample):
        return item
    if isinstance(item, dict):
        if isinstance(item.get("text"), str):
            return item["text"]
        if "messages" in item:
            return ChatSample(_check_messages(item["messages"], origin), origin)
        keys = ", ".join(sorted(map(str, item))) or "none"
        raise ValueError(
            f'[data] {origin}: expected {{"text": "..."}} or {{"messages": [...]}}, got an object with keys {keys}'
        )
    if isinstance(item, (list, tuple)):
        return ChatSample(_check_messages(item, origin), origin)
    raise TypeError(
        f"[data] {origin}: a sample must be a string or a chat conversation "
        f'(list of {{"role", "content"}} dicts), got {type(item).__name__}'
    )


def _content_hash(samples) -> str:
    h = hashlib.sha256()
    for s in samples:
        payload = s if isinstance(s, str) else json.dumps(s.to_json(), sort_keys=True, ensure_ascii=False)
        kind = b"T" if isinstance(s, str) else b"C"
        data = payload.encode("utf-8")
        h.update(kind + len(data).to_bytes(8, "little") + data)
    return "sha256:" + h.hexdigest()[:16]


# ------------------------------------------------------------------------------------ local files
def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"[data] {path}: not UTF-8 text ({e.reason} at byte {e.start}); re-encode the file as UTF-8"
        ) from None


def _parse_txt(path: Path) -> list:
    # A sample ends at a blank line (a line holding only whitespace). Leading/trailing blank lines of
    # each sample go; indentation inside a sample stays (code samples keep their shape).
    text = _read_text(path).replace("\r\n", "\n").replace("\r", "\n")
    samples, current = [], []
    for line in text.split("\n"):
        if line.strip():
            current.append(line)
        elif current:
            samples.append("\n".join(current))
            current = []
    if current:
        samples.append("\n".join(current))
    return samples


def _parse_json(path: Path) -> list:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise ValueError(
            f"[data] {path}:{e.lineno}: invalid JSON ({e.msg}); a .json calibration file must hold one array of strings"
        ) from None
    if not isinstance(data, list):
        raise ValueError(
            f"[data] {path}: a .json calibration file must hold an array of strings, "
            f"got a JSON {type(data).__name__}; use .jsonl for one object per line"
        )
    return [_as_sample(item, f"{path.name}[{i}]") for i, item in enumerate(data)]


def _parse_jsonl(path: Path) -> list:
    samples = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        origin = f"{path.name}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"[data] {path}:{lineno}: invalid JSON ({e.msg}); each line must be one "
                'object like {"text": "..."} or {"messages": [...]}'
            ) from None
        if not isinstance(row, dict):
            raise ValueError(
                f"[data] {path}:{lineno}: each line must be a JSON object like "
                f'{{"text": "..."}}, got a JSON {type(row).__name__}'
            )
        samples.append(_as_sample(row, origin))
    return samples


_PARSERS = {".txt": _parse_txt, ".json": _parse_json, ".jsonl": _parse_jsonl}


def _load_local(path: Path) -> list:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in _PARSERS)
        if not files:
            raise ValueError(f"[data] folder {path} holds no {'/'.join(LOCAL_SUFFIXES)} files")
        return [s for f in files for s in _load_local(f)]
    parser = _PARSERS.get(path.suffix.lower())
    if parser is None:
        raise ValueError(
            f"[data] {path}: unsupported calibration file type {path.suffix or '(none)'!r}; "
            f"supported: {', '.join(LOCAL_SUFFIXES)}"
        )
    return parser(path)


def source_kind(spec) -> str:
    """``"builtin"``, ``"local"`` or ``"hub"`` for a dataset spec; ValueError when it is none of them.

    Touches only the file system (no network, no parsing), so configs can be validated cheaply
    before any model weight is loaded.
    """
    from calibra.data import hub

    if not isinstance(spec, (str, Path)) or not str(spec).strip():
        raise ValueError(
            f"[data] dataset must be 'builtin', a local path or a hub name ({', '.join(hub.HUB_SETS)}), got {spec!r}"
        )
    if str(spec) == "builtin":
        return "builtin"
    if str(spec).startswith("builtin:"):
        from calibra.assets import text_set_name

        try:
            text_set_name(str(spec))
        except ValueError as e:
            raise ValueError(f"[data] {e}") from None
        return "builtin"
    path = Path(spec).expanduser()
    if path.exists():
        return "local"
    if hub.canonical_name(str(spec)) is not None:
        return "hub"
    if path.suffix.lower() in LOCAL_SUFFIXES or "/" in str(spec) or "\\" in str(spec):
        raise FileNotFoundError(
            f"[data] calibration file {str(spec)!r} does not exist; give an existing "
            f".txt/.json/.jsonl file or folder, 'builtin', or a hub name "
            f"({', '.join(hub.HUB_SETS)})"
        )
    raise ValueError(
        f"[data] unknown dataset {str(spec)!r}: expected 'builtin', a local "
        f".txt/.json/.jsonl path, or a hub name ({', '.join(hub.HUB_SETS)})"
    )


# ---------------------------------------------------------------------------------------- dataset
class CalibrationDataset:
    """An ordered collection of calibration samples (texts and/or chat conversations).

    Args:
        samples: strings, or conversations (lists of ``{"role", "content"}`` dicts), or
            ``{"text": ...}`` / ``{"messages": [...]}`` dicts.
        name: a short name recorded with the tokenized data and in stats files.
        version: a version string; default: a content hash (``"sha256:<16 hex>"``), so two datasets
            with the same samples in the same order have the same version.
        source: where the samples came from (for reports), default ``"programmatic"``.
    """

    def __init__(self, samples=(), *, name: str = "custom", version: str | None = None, source: str = "programmatic"):
        if isinstance(samples, (str, bytes)):
            raise TypeError(
                "[data] samples must be a list of texts, got a single string; "
                "wrap it: CalibrationDataset(samples=[text])"
            )
        self._samples = tuple(_as_sample(s, f"{name} sample {i}") for i, s in enumerate(samples))
        self.name = str(name)
        self.version = version if version is not None else _content_hash(self._samples)
        self.source = source

    # ---- constructors
    @classmethod
    def from_local(cls, path, *, name: str | None = None) -> CalibrationDataset:
        """Load ``.txt`` / ``.json`` / ``.jsonl`` (or a folder of them, in name order)."""
        p = Path(path).expanduser()
        if not p.exists():
            raise FileNotFoundError(
                f"[data] calibration file {str(path)!r} does not exist; alternatives: {offline_alternatives()}"
            )
        return cls(_load_local(p), name=name or p.name, source=f"local:{p.name}")

    @classmethod
    def builtin(cls, split: str = "calibration") -> CalibrationDataset:
        """A text set shipped with calibra (:data:`calibra.assets.BUILTIN_TEXTS`): ``"calibration"`` (the
        default, mixed-domain), ``"code"`` (Python stdlib, the default up to calibra 0.1.0), ``"eval"``,
        ``"eval-prose"``. Chats stay conversations (rendered with the tokenizer's chat template, or as
        plain text where it has none)."""
        from calibra.assets import builtin_records, plain_chat

        samples = [
            r["text"]
            if "text" in r
            else ChatSample(_check_messages(r["messages"], r["source"]), r["source"], plain_chat(r["messages"]))
            for r in builtin_records(split)
        ]
        name = "builtin" if split == "calibration" else f"builtin:{split}"
        return cls(samples, name=name, source=f"builtin:{split}")

    @classmethod
    def from_hub(
        cls, name: str, *, split: str | None = None, limit: int | None = None, revision: str | None = None
    ) -> CalibrationDataset:
        """A named hub set (c4, wikitext2, bartowski-v3, the-stack) through the ``datasets`` library.

        ``limit`` caps the number of texts read (streamed where the set is large). Raises
        :class:`calibra.data.hub.HubUnavailableError` naming the offline alternatives when the
        library is missing or the hub cannot be reached (and the set is not in the local cache).
        """
        from calibra.data import hub

        texts, spec = hub.load_hub_texts(name, split=split, limit=limit, revision=revision)
        return cls(texts, name=spec.name, source=spec.describe(split, revision))

    @classmethod
    def from_source(cls, spec, **hub_kwargs) -> CalibrationDataset:
        """Resolve a config's ``dataset`` string: ``"builtin"``, a local path, or a hub name."""
        if isinstance(spec, CalibrationDataset):
            return spec
        kind = source_kind(spec)
        if kind == "builtin":
            from calibra.assets import text_set_name

            return cls.builtin(text_set_name(str(spec)))
        if kind == "local":
            return cls.from_local(spec)
        return cls.from_hub(str(spec), **hub_kwargs)

    # ---- contents
    @property
    def samples(self) -> tuple:
        return self._samples

    @property
    def has_chat(self) -> bool:
        return any(isinstance(s, ChatSample) for s in self._samples)

    def __len__(self) -> int:
        return len(self._samples)

    def __repr__(self) -> str:
        return (
            f"CalibrationDataset(name={self.name!r}, version={self.version!r}, "
            f"samples={len(self)}, source={self.source!r})"
        )

    def texts(self, tokenizer=None) -> list[str]:
        """Every sample as a string; chat samples rendered with ``tokenizer``'s chat template."""
        return [t for t, _ in self.rendered(tokenizer)]

    def rendered(self, tokenizer=None) -> list[tuple[str, bool]]:
        """``(text, is_chat)`` per sample. Rendered chats already hold the template's special tokens,
        so the tokenizer must not add its own on top (the caller needs the flag)."""
        out = []
        for s in self._samples:
            if isinstance(s, str):
                out.append((s, False))
            elif s.plain is not None and not _has_template(tokenizer):
                out.append((s.plain, False))
            else:
                out.append((_render_chat(s, tokenizer), True))
        return out


def _has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None)) and hasattr(tokenizer, "apply_chat_template")


def _render_chat(sample: ChatSample, tokenizer) -> str:
    fix = 'use a chat/instruct model\'s tokenizer, set tokenizer.chat_template, or store the rows as {"text": ...}'
    if tokenizer is None:
        raise ValueError(
            f'[data] {sample.origin}: a {{"messages": [...]}} row needs a tokenizer with a '
            f"chat template to be rendered; pass the tokenizer ({fix})"
        )
    if not getattr(tokenizer, "chat_template", None) or not hasattr(tokenizer, "apply_chat_template"):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f'[data] {sample.origin}: a {{"messages": [...]}} row needs a chat template, '
            f"but tokenizer {name!r} has none; {fix}"
        )
    try:
        text = tokenizer.apply_chat_template(sample.to_json(), tokenize=False)
    except Exception as e:  # jinja errors, missing roles, ...: name the row that caused it
        raise ValueError(
            f"[data] {sample.origin}: the chat template failed on this row ({type(e).__name__}: {e})"
        ) from e
    if not isinstance(text, str):
        raise ValueError(
            f"[data] {sample.origin}: apply_chat_template(tokenize=False) returned "
            f"{type(text).__name__}, expected a string"
        )
    return text
