"""report.html: every verb writes it, it renders in a real browser without errors or network requests,
each section has its plot, and the page names a planted problem module as the worst.

The browser test needs Debian's ``chromium`` (the CI machine has it); it skips where no Chromium is
installed, and .ci/required_tests.txt turns that skip into a failure in CI.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

import calibra  # noqa: E402
from calibra.cli import main  # noqa: E402
from calibra.data import CalibrationConfig  # noqa: E402
from calibra.prune.config import PruningConfig  # noqa: E402
from calibra.quant import GPTQConfig  # noqa: E402
from tests.report.headless import SECTIONS_JS, Browser, find_chromium  # noqa: E402

CAL = CalibrationConfig(num_samples=8, sequence_length=128, seed=0)
SIZE_LIMIT = 2 * 2**20  # the bound for the tiny-moe page


@pytest.fixture(scope="module")
def pages(tmp_path_factory):
    """One output of every verb (the CLI for quantize, as a user runs it), and the page each wrote."""
    root = tmp_path_factory.mktemp("pages")
    q = root / "quantize-moe"
    main(
        ["quantize", "--input", "builtin:tiny-moe", "--output", str(q), "--method", "gptq", "--bits", "4"]
        + ["--group-size", "128", "--samples", "16", "--no-progress"]
    )
    p = root / "prune-llama"
    calibra.prune(
        "builtin:tiny-llama",
        PruningConfig(method="wanda", pattern="2:4"),
        CAL,
        output=p,
        evaluate=False,
        progress=False,
        echo=None,
    )
    stats = root / "stats.safetensors"
    calibra.calibrate("builtin:tiny-moe", CAL, observers=("hessian", "kv"), output=stats, progress=False, echo=None)
    import calibra.kv as kv

    preset = root / "kv_preset.json"
    kv.calibrate("builtin:tiny-llama", CAL, rank=16, output=preset, evaluate=False, progress=False, echo=None)
    return {
        "quantize": (q / "report.html", {"summary", "modules", "moe", "memory"}),
        "prune": (p / "report.html", {"summary", "modules", "sparsity", "memory"}),
        "calibrate": (root / "stats.report.html", {"modules", "moe", "kv"}),
        "kv": (root / "kv_preset.report.html", {"summary", "kv"}),
    }


def _worst(html: str) -> str:
    m = re.search(r'id="worst-module">([^<]+)<', html)
    assert m, "the page names no worst module"
    return m.group(1)


def test_every_verb_writes_a_self_contained_page(pages):
    for verb, (page, sections) in pages.items():
        assert page.is_file(), f"{verb} wrote no {page.name}"
        html = page.read_text(encoding="utf-8")
        assert "<script" not in html, f"{verb}: the page must read without JavaScript"
        found = set(re.findall(r'<section id="([a-z]+)">', html))
        assert sections <= found, f"{verb}: sections {sorted(sections - found)} missing"
        # no external resource: every src/href is a fragment or inline data (SVG namespaces are not fetched)
        refs = re.findall(r'(?:src|href)="([^"]*)"', html)
        assert all(r.startswith(("#", "data:")) for r in refs), [r for r in refs if not r.startswith(("#", "data:"))]


def test_quantize_page_size_and_measured_memory(pages):
    page = pages["quantize"][0]
    assert page.stat().st_size < SIZE_LIMIT
    report = json.loads((page.parent / "report.json").read_text())
    # the measured peak went into report.json too (the page is rendered from it), and it is a real number
    assert report["measured"]["peak_rss"] > 50 * 2**20
    assert "process peak RSS" in page.read_text()


def test_memory_is_measured_phase_by_phase(pages):
    """Each planned phase of the whole-model jobs has its own measured peak (VmHWM where it rose in that
    phase, else sampled), shown beside the plan's; the peaks are real, none exceeds the job's overall peak,
    and the largest of them is that peak (the phases cover the job from the load on)."""
    for verb in ("quantize", "prune"):
        page = pages[verb][0]
        report = json.loads((page.parent / "report.json").read_text())
        phases = report["measured"]["phases"]
        assert set(report["plan"]["phases"]) <= set(phases), (verb, phases)
        assert "open_phase" not in report["measured"]  # the report closed the last phase
        for name, peak in phases.items():
            assert 50 * 2**20 < peak <= report["measured"]["peak_rss"], (verb, name, peak)
        assert set(report["measured"]["phases_exact"]) == set(phases)  # each says how it was measured
        html = page.read_text()
        assert "load: measured (" in html and "save: measured (" in html


@pytest.mark.parametrize("verb", ["quantize", "prune", "calibrate", "kv"])
def test_page_renders_in_headless_chromium(pages, verb, tmp_path):
    binary = find_chromium()
    if binary is None:
        pytest.skip("no Chromium (apt-get install chromium); required in CI")
    page, sections = pages[verb]
    with Browser(binary) as b:
        b.open(page)
        drawn = {s["id"]: s["svgs"] for s in json.loads(b.evaluate(SECTIONS_JS))}
        assert b.errors() == []
        others = [u for u in b.requests() if u != page.absolute().as_uri() and not u.startswith("data:")]
        assert others == [], f"the page requested {others}"
        if verb == "quantize":  # the docs' screenshot is of this page; make sure a capture works
            png = b.screenshot(tmp_path / "shot.png", height=600)
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for sid in sections:
        assert drawn.get(sid), f"{verb}: section {sid} has no plot"
        assert all(w > 100 and h > 50 for w, h in drawn[sid]), f"{verb}: a plot of {sid} rendered empty: {drawn[sid]}"


PLANTED = "model.layers.1.mlp.down_proj"


def _quantize_llama(out: Path, monkeypatch=None):
    calibra.quantize(
        "builtin:tiny-llama",
        GPTQConfig(bits=4, group_size=32),
        CAL,
        output=out,
        evaluate=False,
        progress=False,
        echo=None,
    )
    return (out / "report.html").read_text(encoding="utf-8")


def test_page_names_a_planted_problem_module_as_worst(tmp_path, monkeypatch):
    """One module quantized at 2 bits among 4-bit ones: the page must name it the worst. A control run
    without the plant shows the module is not the worst on its own."""
    clean = _worst(_quantize_llama(tmp_path / "clean"))
    assert clean != PLANTED

    from calibra.quant import apply

    base = apply.LayerQuantizer

    class Planted(base):  # the quantizer every verb uses, with one per-module override (as mixed precision)
        def __init__(self, config, adapter, *a, overrides=None, **kw):
            overrides = dict(overrides or {}, **{PLANTED: dataclasses.replace(config, bits=2)})
            super().__init__(config, adapter, *a, overrides=overrides, **kw)

    monkeypatch.setattr(apply, "LayerQuantizer", Planted)
    html = _quantize_llama(tmp_path / "planted")
    assert _worst(html) == PLANTED
    codes = json.loads((tmp_path / "planted" / "quantization.json").read_text())["modules"][PLANTED]
    assert codes["bits"] == 2  # the plant really happened


def test_without_matplotlib_the_page_keeps_the_numbers_as_tables(pages, monkeypatch):
    from calibra import report as rp
    from calibra.report import _plots

    monkeypatch.setattr(_plots, "available", lambda: False)
    report = json.loads((pages["quantize"][0].parent / "report.json").read_text())
    html = rp.render_report(report)
    assert "<svg" not in html and "matplotlib is not installed" in html
    worst = max(report["modules"], key=lambda r: r["loss"])  # the worst by absolute loss is in the full table
    assert worst["module"] in html
    assert _worst(html) == _worst(pages["quantize"][0].read_text())


def test_calibra_report_regenerates_with_attribution(pages, tmp_path):
    out = pages["quantize"][0].parent
    ev = tmp_path / "attribution.json"
    main(
        ["eval", "--model", str(out), "--reference", "builtin:tiny-moe", "--metric", "kl-divergence"]
        + ["--attribution", "--max-tokens", "512", "--json", str(ev)]
    )
    target = tmp_path / "again.html"
    assert main(["report", str(out), "--attribution", str(ev), "--output", str(target)]) == 0
    html = target.read_text()
    assert '<section id="attribution">' in html
    layers = json.loads(ev.read_text())["attribution"]["layers"]
    costliest = max(layers, key=lambda r: r["kl_mean"])["name"]
    assert re.search(r'The costliest layer: <strong class="worst">([^<]+)<', html).group(1) == costliest


def test_calibra_report_errors_name_the_problem(tmp_path, pages):
    with pytest.raises(ValueError, match=r"no report.json in .*quantize and prune write report.json"):
        main(["report", str(tmp_path)])
    bad = tmp_path / "x.json"
    bad.write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="is not a KV preset"):
        main(["report", str(bad)])
    with pytest.raises(ValueError, match="no per-layer attribution"):
        main(["report", str(pages["quantize"][0].parent), "--attribution", str(bad)])
    # the stats file and the preset regenerate beside themselves
    stats_page = pages["calibrate"][0]
    stats_page.unlink()
    assert main(["report", str(stats_page.with_name("stats.safetensors"))]) == 0
    assert '<section id="moe">' in stats_page.read_text()


def test_report_help_describes_the_command(capsys):
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    text = capsys.readouterr().out
    assert "--attribution" in text and "report.json" in text and "examples:" in text
