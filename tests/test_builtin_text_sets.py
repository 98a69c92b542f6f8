"""The built-in text sets: the mixed-domain default calibration set, the Python-only set it replaced
(builtin:code), the held-out sets, their manifest, and how the data layer reaches them by name."""

from __future__ import annotations

import importlib.util
import json
import warnings
from collections import Counter
from pathlib import Path

import pytest

from calibra import assets
from calibra.data import CalibrationConfig, CalibrationDataset
from calibra.data.dataset import ChatSample, source_kind

REPO = Path(__file__).resolve().parents[1]
TEXT = assets.ASSETS_DIR / "text"


def _paragraphs(texts) -> set[str]:
    return {p.strip() for t in texts for p in t.split("\n\n") if len(p.strip()) >= 60}


def _record_bytes(r) -> int:
    return len(r["text"].encode()) if "text" in r else sum(len(m["content"].encode()) for m in r["messages"])


def test_default_calibration_is_the_mixed_set():
    default = CalibrationDataset.from_source("builtin")
    named = CalibrationDataset.from_source("builtin:calibration")
    assert default.version == named.version == CalibrationDataset.builtin().version
    assert default.name == "builtin" and default.source == "builtin:calibration"
    assert CalibrationConfig().dataset == "builtin"
    records = assets.builtin_records("calibration")
    kinds = Counter(r["kind"] for r in records)
    for domain in ("narrative", "dialogue", "chat", "instruction", "technical", "math", "code"):
        assert kinds[domain] > 0, domain
    langs = {r.get("lang") for r in records}
    assert {"en", "de", "fr", "es", "zh"} <= langs
    # no domain drowns the rest: code (with docstrings) and English technical text stay under half each
    total = sum(map(_record_bytes, records))
    stdlib = sum(_record_bytes(r) for r in records if r["source"].startswith("stdlib:"))
    technical = sum(_record_bytes(r) for r in records if r["kind"] == "technical")
    assert stdlib < total / 2 and technical < total / 2
    assert default.has_chat


def test_old_default_reachable_as_builtin_code():
    code = CalibrationDataset.from_source("builtin:code")
    records = assets.builtin_records("code")
    assert code.name == "builtin:code" and len(code) == len(records) >= 128
    assert {r["kind"] for r in records} == {"code", "docstring", "prose"}
    assert all(r["source"].startswith("stdlib:") for r in records)
    assert code.version != CalibrationDataset.builtin().version


def test_mixed_code_share_comes_from_the_code_set():
    # the stdlib records of the default set are copies of builtin:code records (the calibration split of
    # tools/train_builtin.py), so they stay disjoint from the models' training text and from builtin:eval
    code = {(r["source"], r["kind"], r["text"]) for r in assets.builtin_records("code")}
    share = [r for r in assets.builtin_records("calibration") if r["source"].startswith("stdlib:")]
    assert share
    for r in share:
        assert (r["source"], r["kind"], r["text"]) in code, r["source"]


def test_held_out_sets_share_no_text_with_calibration():
    calib = _paragraphs(assets.builtin_texts("calibration")) | _paragraphs(assets.builtin_texts("code"))
    prose = assets.builtin_records("eval-prose")
    assert {r["kind"] for r in prose} <= {"narrative", "essay"} and {r["lang"] for r in prose} == {"en"}
    assert sum(map(_record_bytes, prose)) >= 24 * 1024
    shared = _paragraphs(assets.builtin_texts("eval-prose")) & calib
    assert not shared, sorted(shared)[:2]
    # the text added to the default set (everything but its stdlib share, which is disjoint from builtin:eval
    # by document; the stdlib repeats boilerplate such as licence headers across documents) is not in builtin:eval
    added = [r for r in assets.builtin_records("calibration") if not r["source"].startswith("stdlib:")]
    added_texts = [r["text"] if "text" in r else assets.plain_chat(r["messages"]) for r in added]
    shared = _paragraphs(assets.builtin_texts("eval")) & _paragraphs(added_texts)
    assert not shared, sorted(shared)[:2]
    # by document too: no authored document id is in both
    ids = lambda split: {r["source"].split("::", 1)[-1] for r in assets.builtin_records(split)}  # noqa: E731
    assert not ids("eval-prose") & ids("calibration")


def test_manifest_matches_the_files_and_names_every_licence():
    manifest = json.loads((TEXT / "MANIFEST.json").read_text(encoding="utf-8"))
    assert set(manifest["sets"]) == set(assets.BUILTIN_TEXTS)
    for name, entry in manifest["sets"].items():
        assert entry["file"] == assets.BUILTIN_TEXTS[name]
        records = assets.builtin_records(name)
        assert entry["records"] == len(records)
        assert entry["bytes"] == sum(map(_record_bytes, records))
        assert sum(entry["bytes_by_kind"].values()) == entry["bytes"]
        for origin in entry["bytes_by_source"]:
            assert manifest["sources"][origin]["licence"], origin
    origins = {r["source"].split(":", 1)[0] for n in assets.BUILTIN_TEXTS for r in assets.builtin_records(n)}
    assert origins == {"stdlib", "calibra", "python-docs"}


def test_shipped_sets_are_what_the_builder_makes():
    # editing tools/builtin_text/ without rerunning tools/build_builtin_text.py fails here
    spec = importlib.util.spec_from_file_location("build_builtin_text", REPO / "tools" / "build_builtin_text.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    assert build.authored_records("calib_") + build.code_share() == assets.builtin_records("calibration")
    assert build.authored_records("eval_prose_") == assets.builtin_records("eval-prose")


def test_added_text_stays_small():
    added = sum((TEXT / f).stat().st_size for f in ("mixed.jsonl", "eval_prose.jsonl", "MANIFEST.json"))
    assert added <= 400 * 1024, added


def test_text_specs_resolve_by_name_and_refuse_unknown_ones():
    assert assets.resolve_texts("builtin", "eval") == assets.builtin_texts("eval")
    assert assets.resolve_texts("builtin", "calibration") == assets.builtin_texts("calibration")
    assert assets.resolve_texts("builtin:eval-prose", "eval") == assets.builtin_texts("eval-prose")
    assert assets.resolve_texts("builtin:code", "eval") == assets.builtin_texts("code")
    for spec in ("builtin:code", "builtin:eval-prose", "builtin:calibration"):
        assert source_kind(spec) == "builtin"
    for bad in ("builtin:nope", "builtin:tiny-llama"):
        with pytest.raises(ValueError, match="builtin:calibration, builtin:code, builtin:eval, builtin:eval-prose"):
            source_kind(bad)
        with pytest.raises(ValueError, match="unknown built-in text set"):
            assets.resolve_texts(bad, "eval")
    with pytest.raises(ValueError, match="unknown built-in text set"):
        CalibrationConfig(dataset="builtin:nope").validate()


class _TemplateTokenizer:
    chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"

    def apply_chat_template(self, messages, tokenize=False):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages)


def test_builtin_chats_use_the_template_where_there_is_one_and_plain_text_elsewhere():
    ds = CalibrationDataset.builtin()
    chats = [s for s in ds.samples if isinstance(s, ChatSample)]
    assert chats and all(s.plain for s in chats)
    first = chats[0]
    idx = ds.samples.index(first)
    plain = ds.rendered(object())[idx]  # a tokenizer without a chat template
    assert plain == (first.plain, False) and plain[0].startswith("User: ")
    templated = ds.rendered(_TemplateTokenizer())[idx]
    assert templated == (_TemplateTokenizer().apply_chat_template(first.to_json()), True)
    # builtin_texts (evaluation streams, tokenizer training in tests) gives the same plain form
    assert first.plain in assets.builtin_texts("calibration")
    # a user's chat rows without a plain form still need a template
    with pytest.raises(ValueError, match="chat template"):
        CalibrationDataset([[{"role": "user", "content": "hi"}]]).rendered(object())


def test_default_fills_the_cli_request_on_the_builtin_models():
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    from calibra.data import tokenize_calibration

    tok = AutoTokenizer.from_pretrained(assets.resolve_model("builtin:tiny-llama"), local_files_only=True)
    cfg = CalibrationConfig(num_samples=128, sequence_length=256)  # the CLI's defaults on a 256-position model
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "less calibration data than requested" would fail here
        data = tokenize_calibration(CalibrationDataset.builtin(), tok, cfg, max_positions=256)
    assert data.token_count == 128 * 256 and data.dataset == "builtin"
