"""Named calibration sets on the Hugging Face hub, read through the ``datasets`` library.

Install with ``pip install calibra[hub]``. The sets are the ones quantization tools calibrate on:

=============  =====================================================================================
name           what it is
=============  =====================================================================================
c4             allenai/c4, first English shard (the GPTQ paper's calibration data), streamed
wikitext2      Salesforce/wikitext ``wikitext-2-raw-v1`` train split, lines joined into articles
bartowski-v3   bartowski's ``calibration_datav3.txt`` (the llama.cpp imatrix set: prose, code,
               multilingual, facts), paragraphs as samples
the-stack      bigcode/the-stack-smol, Python files, streamed (gated: accept its terms on the hub
               and log in with ``hf auth login``)
=============  =====================================================================================

With ``HF_HUB_OFFLINE=1`` / ``HF_DATASETS_OFFLINE=1`` the library still serves a set from its
local cache; when the library is missing, the hub cannot be reached or the set is not cached,
:class:`HubUnavailableError` says so and names the offline alternatives (``"builtin"``, a local
``.txt``/``.json``/``.jsonl``).

``_load_rows`` is the only function that touches the ``datasets`` library (tests replace it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

__all__ = ["HubSet", "HUB_SETS", "HubUnavailableError", "canonical_name", "load_hub_texts"]


class HubUnavailableError(RuntimeError):
    """A hub set could not be loaded (library missing, offline, gated, not cached)."""


@dataclass(frozen=True)
class HubSet:
    name: str
    path: str  # first argument of datasets.load_dataset
    text_field: str
    split: str = "train"
    config: str | None = None
    data_files: str | None = None
    data_dir: str | None = None
    streaming: bool = True  # big sets are streamed: only the rows read are downloaded
    default_limit: int = 2048  # texts read when the caller gives no limit
    join: str | None = None  # post-processing of rows into documents ("wikitext")
    builder_kwargs: dict = field(default_factory=dict)
    gated: bool = False
    aliases: tuple = ()

    def describe(self, split: str | None = None, revision: str | None = None) -> str:
        parts = [f"hub:{self.path}"]
        if self.config:
            parts.append(self.config)
        if self.data_dir:
            parts.append(self.data_dir)
        if self.data_files and self.path != "text":
            parts.append(self.data_files)
        if self.path == "text":
            parts = [f"hub:{self.data_files}"]
        parts.append(f"split={split or self.split}")
        if revision:
            parts.append(f"revision={revision}")
        return " ".join(parts)


HUB_SETS: dict[str, HubSet] = {
    "c4": HubSet("c4", "allenai/c4", "text", data_files="en/c4-train.00000-of-01024.json.gz", aliases=("allenai/c4",)),
    "wikitext2": HubSet(
        "wikitext2",
        "Salesforce/wikitext",
        "text",
        config="wikitext-2-raw-v1",
        streaming=False,
        default_limit=100_000,
        join="wikitext",
        aliases=("wikitext", "wikitext-2", "wikitext2-raw", "salesforce/wikitext"),
    ),
    "bartowski-v3": HubSet(
        # The canonical copy is a GitHub gist; the datasets "text" builder reads a URL as a data file
        # and splits it into paragraphs (blank-line separated), the same rule as our .txt loader.
        "bartowski-v3",
        "text",
        "text",
        data_files="https://gist.githubusercontent.com/bartowski1182/eb213dccb3571f863da82e99418f81e8"
        "/raw/calibration_datav3.txt",
        streaming=False,
        default_limit=100_000,
        builder_kwargs={"sample_by": "paragraph"},
        aliases=("bartowski", "bartowski-v3", "calibration_datav3", "calibration-datav3"),
    ),
    "the-stack": HubSet(
        "the-stack",
        "bigcode/the-stack-smol",
        "content",
        data_dir="data/python",
        gated=True,
        aliases=("the-stack-smol", "bigcode/the-stack-smol", "stack"),
    ),
}


def offline_alternatives() -> str:
    """What a user without network access can calibrate on instead (named in every refusal)."""
    return (
        "dataset='builtin' (ships with calibra, no network) or a local file "
        "(.txt with samples separated by blank lines, .json array of strings, "
        '.jsonl with {"text": ...} or {"messages": [...]} per line)'
    )


def canonical_name(name: str) -> str | None:
    """The registry name for ``name`` or one of its aliases (case-insensitive); None if unknown."""
    key = name.strip().lower()
    for canon, spec in HUB_SETS.items():
        if key == canon or key in spec.aliases:
            return canon
    return None


def _offline_env() -> bool:
    return any(
        os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
        for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def _load_rows(spec: HubSet, split: str, revision: str | None):
    """Rows (dicts) of a hub set: the one place that calls the ``datasets`` library."""
    import datasets  # noqa: F401  (ImportError is turned into HubUnavailableError by the caller)

    kwargs = dict(spec.builder_kwargs)
    if spec.config is not None:
        kwargs["name"] = spec.config
    if spec.data_files is not None:
        kwargs["data_files"] = spec.data_files
    if spec.data_dir is not None:
        kwargs["data_dir"] = spec.data_dir
    if revision is not None:
        kwargs["revision"] = revision
    return datasets.load_dataset(spec.path, split=split, streaming=spec.streaming, **kwargs)


def _join_wikitext(rows):
    """wikitext rows are lines; an article starts at a top-level heading `` = Title = ``."""
    doc = []
    for line in rows:
        stripped = line.strip()
        is_title = stripped.startswith("= ") and stripped.endswith(" =") and not stripped.startswith("= =")
        if is_title and doc:
            yield "\n".join(doc)
            doc = []
        if stripped:
            doc.append(line.rstrip())
    if doc:
        yield "\n".join(doc)


def _unavailable(spec: HubSet, why: str) -> HubUnavailableError:

    hints = []
    if _offline_env():
        hints.append("HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set and the set is not in the local cache")
    if spec.gated:
        hints.append(f"{spec.path} is gated: accept its terms on huggingface.co and run `hf auth login`")
    hint = ("; ".join(hints) + ". ") if hints else ""
    return HubUnavailableError(
        f"[data] cannot load hub set {spec.name!r} ({spec.describe()}): {why}. {hint}"
        f"Offline alternatives: {offline_alternatives()}"
    )


def load_hub_texts(
    name: str, *, split: str | None = None, limit: int | None = None, revision: str | None = None
) -> tuple[list[str], HubSet]:
    """The first ``limit`` non-empty texts of hub set ``name`` (default: the set's default_limit)."""
    canon = canonical_name(name)
    if canon is None:
        raise ValueError(
            f"[data] unknown hub set {name!r}; known: {', '.join(HUB_SETS)} "
            f"(or 'builtin', or a local .txt/.json/.jsonl path)"
        )
    spec = HUB_SETS[canon]
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"[data] limit must be a positive int or None, got {limit!r}")
    limit = spec.default_limit if limit is None else limit
    split = split or spec.split

    try:
        rows = _load_rows(spec, split, revision)
    except ImportError as e:
        raise _unavailable(
            spec, f"the 'datasets' library is not installed ({e}); install it with `pip install calibra[hub]`"
        ) from e
    except Exception as e:  # connection errors, offline mode without a cache, gated repo, bad split
        raise _unavailable(spec, f"{type(e).__name__}: {e}") from e

    def raw_texts():
        for i, row in enumerate(rows):
            try:
                value = row[spec.text_field]
            except (KeyError, TypeError):
                keys = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
                raise ValueError(
                    f"[data] hub set {spec.name!r}: row {i} has no {spec.text_field!r} field (has: {keys})"
                ) from None
            if isinstance(value, str):
                yield value

    texts = []
    try:
        stream = _join_wikitext(raw_texts()) if spec.join == "wikitext" else raw_texts()
        for text in stream:
            if text.strip():
                texts.append(text)
                if len(texts) >= limit:
                    break
    except ValueError:
        raise
    except Exception as e:  # a streamed set fails while iterating, not at load_dataset()
        raise _unavailable(spec, f"{type(e).__name__} while reading rows: {e}") from e
    return texts, spec
