"""From the jobs' JSON (report.json, a KV preset, a statistics file's metadata, ``calibra eval --json``) to
the page's sections. Reading only: nothing here runs a model or imports a verb.

Each section pairs a plot with the numbers behind it as a table, so the page says the same thing without
matplotlib (the plot is then left out, with a note) and a plot that fails to render costs the page one
figure, never the job that writes it.
"""

from __future__ import annotations

import re
import statistics

from calibra.report import _plots
from calibra.report._page import Section, details, esc, figure, fmt, para, table

WORST_SHOWN = 5
# an expert whose Hessian takes at least this weight from its layer's pooled Hessian is "shrunk": it saw
# too few tokens for its own statistics to dominate (lambda = tau / (n + tau), calibra.calib.moe)
SHRUNK_LAMBDA = 0.5
_MIB = 2.0**20
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")


def add_plot(section: Section, build, caption: str) -> None:
    """``build()`` returns SVG text; without matplotlib or on an error the section keeps its tables."""
    if not _plots.available():
        section.add(para("(plot left out: matplotlib is not installed; pip install 'calibra[report]')", "note"))
        return
    try:
        section.add(figure(build(), caption))
    except Exception as e:  # a plotting bug must not cost the numbers (the tables follow)
        section.add(para(f"(plot failed: {type(e).__name__}: {e})", "note"))


# ------------------------------------------------------------------------------------------ helpers
def layer_of(name: str, given=None) -> int | None:
    if isinstance(given, int):
        return given
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def role_of(name: str) -> str:
    """The module's job, the same in every layer: ``self_attn.q_proj``, ``mlp.experts.*.down_proj``."""
    m = _LAYER.search(name)
    tail = name[m.end() :] if m else name
    return re.sub(r"experts\.\d+\.", "experts.*.", tail)


def _bytes(v) -> str:
    return "-" if v is None else f"{v / _MIB:.1f} MiB" if v < 2**30 else f"{v / 2**30:.2f} GiB"


def _kv(d: dict | None, skip=()) -> str:
    if not isinstance(d, dict):
        return fmt(d)
    return ", ".join(f"{k}={fmt(v)}" for k, v in d.items() if k not in skip and not isinstance(v, (dict, list)))


# ------------------------------------------------------------------------------------------ summary
def summary(report: dict) -> Section:
    s = Section("summary", "Summary")
    kind = str(report.get("format", "")).replace("calibra-", "").replace("-report", "")
    settings = report.get("settings") or {}
    model = report.get("model") or {}
    rows = [
        ["model", f"{model.get('source')} ({model.get('model_type')}, {model.get('num_layers')} decoder layers)"],
        ["job", f"{kind}: {settings.get('method')}"],
        ["settings", _kv(settings.get("config"), skip=("method",))],
    ]
    if settings.get("scheme") or settings.get("kv_cache"):
        what = f"scheme {fmt(settings.get('scheme'))}, KV cache {fmt(settings.get('kv_cache'))}"
        rows.append(["activations / KV", what])
    cal = settings.get("calibration")
    rows.append(["calibration", _kv(cal, skip=("fingerprint",)) if isinstance(cal, dict) else fmt(cal)])
    summ = report.get("summary") or {}
    if "avg_bits_per_weight" in summ:
        n, b = summ.get("quantized_weights") or 0, summ.get("avg_bits_per_weight") or 0
        rows.append(
            [
                "sizes",
                f"{summ.get('quantized_modules')} modules, {n} weights: {_bytes(2 * n)} as fp16 -> "
                f"{_bytes(n * b / 8)} at {b:.3f} bits/weight; dense modules: {len(summ.get('dense_modules') or [])}",
            ]
        )
    if summ.get("export_dense"):  # widths an --export format cannot hold: those Linears stayed dense
        kept = summ["export_dense"]
        rows.append(["kept dense for export", "; ".join(f"{n}: {why}" for n, why in sorted(kept.items()))])
    if "achieved_sparsity" in summ:
        rows.append(
            [
                "sizes",
                f"{summ.get('pruned_modules')} modules, {summ.get('zeroed_weights')} of "
                f"{summ.get('pruned_weights_total')} weights zeroed: sparsity target "
                f"{fmt(summ.get('target_sparsity'))}, achieved {fmt(summ.get('achieved_sparsity'))}",
            ]
        )
    ev = report.get("eval") or {}
    if ev.get("perplexity"):
        p = ev["perplexity"]
        base, comp = p.get("baseline"), p.get("compressed")
        rel = f" ({(comp / base - 1) * 100:+.2f}%)" if base and comp else ""
        rows.append(["perplexity", f"{fmt(base)} -> {fmt(comp)}{rel}"])
    if ev.get("kl_divergence"):
        k = ev["kl_divergence"]
        rows.append(
            [
                "KL divergence",
                f"{k.get('direction', 'KL')}: mean {fmt(k.get('mean'))}, median {fmt(k.get('median'))}, "
                f"max {fmt(k.get('max'))} ({k.get('mode')}{'-' + str(k['top_k']) if k.get('top_k') else ''})",
            ]
        )
    if ev.get("protocol"):
        pr = ev["protocol"]
        ds = pr.get("dataset") or {}
        rows.append(
            [
                "eval protocol",
                f"seq_len {pr.get('seq_len')}, stride {pr.get('stride')}, {pr.get('tokens_scored')} tokens of "
                f"{ds.get('name')} (version {ds.get('version')}, {pr.get('windows')} windows)",
            ]
        )
    elif not ev:
        rows.append(["evaluation", "not run"])
    rows.append(["versions", _kv(report.get("versions"))])
    rows.append(["seed", fmt(report.get("seed"))])
    if report.get("output"):
        rows.append(["output", report["output"]])
    s.add(table(["", ""], rows))
    t = report.get("timings") or {}
    stages = {k: float(v) for k, v in t.items() if isinstance(v, (int, float)) and k != "total"}
    if stages:
        total = t.get("total")
        if isinstance(total, (int, float)) and total > sum(stages.values()):
            stages["other (load, write, ...)"] = float(total) - sum(stages.values())
        add_plot(s, lambda: _plots.time_by_stage(stages), f"time by stage; total {fmt(total)} s")
        s.add(table(["stage", "seconds"], [[k, v] for k, v in stages.items()] + [["total", total]]))
    per_layer = t.get("per_layer")
    if per_layer:
        s.add(details("seconds per decoder layer", table(["layer", "seconds"], list(enumerate(per_layer)))))
    return s


# ------------------------------------------------------------------------------------------ modules
def module_points(rows: list[dict]) -> tuple[list[dict], str]:
    """Each module's relative loss. Pruning logs a relative output error (||(W - W')X|| / ||WX|| on the
    calibration inputs): it is used as is. GPTQ/RTN log an absolute loss, which grows with a module's size
    and its inputs' scale, so it is divided by the median loss of the same role over all layers: a module
    that lost more than its peers stands out however the scale drifts with depth."""
    pts = []
    relative = all(isinstance(r.get("reconstruction_error"), (int, float)) for r in rows)
    by_role: dict[str, list[float]] = {}
    for r in rows:
        by_role.setdefault(role_of(r["module"]), []).append(float(r.get("loss") or 0.0))
    medians = {k: statistics.median(v) for k, v in by_role.items()}
    roles = sorted(by_role)
    for r in rows:
        role = role_of(r["module"])
        if relative:
            y = float(r["reconstruction_error"])
        else:
            med = medians[role]
            y = float(r.get("loss") or 0.0) / med if med > 0 else 0.0
        layer = layer_of(r["module"], r.get("layer"))
        k = roles.index(role)
        pts.append(
            {
                "name": r["module"],
                "role": role,
                "layer": layer,
                # roles side by side within a layer, so one layer's modules do not hide each other
                "x": (layer if layer is not None else -1) + (k - (len(roles) - 1) / 2) * 0.6 / max(len(roles), 1),
                "y": y,
                "ladder": bool(r.get("ladder_steps")) or bool(r.get("float64")),
                "row": r,
            }
        )
    label = (
        "relative output error ||(W-W')X|| / ||WX||"
        if relative
        else "loss / median loss of the same role (1 = typical)"
    )
    return pts, label


def modules(report: dict) -> Section | None:
    rows = [r for r in report.get("modules") or [] if isinstance(r, dict) and "module" in r]
    if not rows:
        return None
    s = Section("modules", "Reconstruction loss per module")
    pts, label = module_points(rows)
    ranked = sorted(pts, key=lambda p: p["y"], reverse=True)
    worst = ranked[:WORST_SHOWN]
    w = worst[0]
    s.add(
        f'<p class="callout">Worst module: <strong class="worst" id="worst-module">{esc(w["name"])}</strong> '
        f"(layer {esc(w['layer'])}, {esc(label)}: {esc(fmt(w['y']))}). The next: "
        + ", ".join(f"{esc(p['name'])} ({esc(fmt(p['y']))})" for p in worst[1:])
        + ".</p>"
    )
    add_plot(
        s,
        lambda: _plots.module_loss(pts, [p["name"] for p in worst], label),
        f"{label}, per module by decoder layer; the {len(worst)} worst named, modules whose Cholesky needed a "
        "larger damping (the ladder) or float64 ringed",
    )
    cols = ["module", "layer", "relative", "loss", "damp %", "ladder steps", "float64", "samples", "seconds"]

    def line(p):
        r = p["row"]
        return [
            p["name"],
            p["layer"],
            p["y"],
            r.get("loss"),
            r.get("damp_percent"),
            r.get("ladder_steps"),
            r.get("float64"),
            r.get("samples"),
            r.get("seconds"),
        ]

    s.add(para(f"The {len(worst)} worst modules:"))
    s.add(table(cols, [line(p) for p in worst], classes=["worst"] + [None] * (len(worst) - 1)))
    ladder = [p for p in pts if p["ladder"]]
    damp = (report.get("settings") or {}).get("config") or {}
    if ladder:
        s.add(
            para(
                f"The damping ladder intervened on {len(ladder)} module(s): the first Cholesky at damp_percent "
                f"{fmt(damp.get('damp_percent'))} failed and a larger value (or float64) succeeded."
            )
        )
        s.add(table(cols, [line(p) for p in ladder]))
    else:
        s.add(
            para(
                f"The damping ladder did not intervene: every module factorized at damp_percent "
                f"{fmt(damp.get('damp_percent'))} on the first try."
                if any("ladder_steps" in p["row"] for p in pts)
                else "No damping (data-free method)."
            )
        )
    s.add(details(f"all {len(pts)} modules", table(cols, [line(p) for p in pts])))
    return s


def sparsity(report: dict) -> Section | None:
    rows = [r for r in report.get("modules") or [] if isinstance(r, dict) and "achieved_sparsity" in r]
    if not rows:
        return None
    s = Section("sparsity", "Achieved sparsity per module")
    target = (report.get("summary") or {}).get("target_sparsity")
    roles = sorted({role_of(r["module"]) for r in rows})
    pts = []
    for r in rows:
        layer = layer_of(r["module"], r.get("layer"))
        k = roles.index(role_of(r["module"]))
        pts.append(
            {
                "role": role_of(r["module"]),
                "x": (layer if layer is not None else -1) + (k - (len(roles) - 1) / 2) * 0.6 / len(roles),
                "y": float(r["achieved_sparsity"]),
            }
        )
    add_plot(s, lambda: _plots.sparsity(pts, target), "achieved sparsity per module by decoder layer")
    off = sorted(rows, key=lambda r: abs(r["achieved_sparsity"] - (r.get("target_sparsity") or 0)), reverse=True)
    cols = ["module", "pattern", "target", "achieved", "relative output error"]
    s.add(para("The modules furthest from their target:"))
    s.add(
        table(
            cols,
            [
                [
                    r["module"],
                    r.get("pattern"),
                    r.get("target_sparsity"),
                    r["achieved_sparsity"],
                    r.get("reconstruction_error"),
                ]
                for r in off[:WORST_SHOWN]
            ],
        )
    )
    return s


# ------------------------------------------------------------------------------------------ attribution
def attribution(doc: dict | None) -> Section | None:
    """``calibra eval --attribution --json`` output, or its ``attribution`` member."""
    if not doc:
        return None
    a = doc.get("attribution", doc)
    layers = sorted(a.get("layers") or [], key=lambda r: r.get("layer", 0))
    if not layers:
        return None
    s = Section("attribution", "KL attribution by layer")
    key = "kl_mean" if a.get("rank_by", "kl") == "kl" else "ppl_delta"
    vals = [float(r.get(key) or 0.0) for r in layers]
    worst = max(range(len(vals)), key=lambda i: vals[i])
    s.add(
        f'<p class="callout">The costliest layer: <strong class="worst">{esc(layers[worst].get("name"))}</strong> '
        f"({'KL(ref||hybrid)' if key == 'kl_mean' else 'perplexity increase'} {esc(fmt(vals[worst]))}).</p>"
    )
    ds = a.get("dataset") or {}
    add_plot(
        s,
        lambda: _plots.bars_by_layer(
            vals,
            [str(r.get("layer")) for r in layers],
            "KL(ref || hybrid), nats/token" if key == "kl_mean" else "perplexity increase",
            worst,
            "attribution",
        ),
        f"each bar: the reference model with only that layer compressed, measured on {a.get('tokens')} tokens "
        f"of {ds.get('name')}",
    )
    cols = ["layer", "KL(ref||hyb)", "KL(hyb||ref)", "max KL", "perplexity", "perplexity increase"]
    rows = [
        [r.get("name"), r.get("kl_mean"), r.get("kl_reverse_mean"), r.get("kl_max"), r.get("ppl"), r.get("ppl_delta")]
        for r in sorted(layers, key=lambda r: -(r.get(key) or 0.0))
    ]
    full = a.get("full")
    if full:
        rows.append(
            ["all layers", full.get("kl_mean"), full.get("kl_reverse_mean"), full.get("kl_max"), full.get("ppl"), None]
        )
    s.add(table(cols, rows))
    return s


# ------------------------------------------------------------------------------------------ MoE
def moe(coverage: list[dict] | None) -> Section | None:
    if not coverage:
        return None
    s = Section("moe", "MoE: tokens per expert per layer")
    blocks = sorted({c["block"] for c in coverage}, key=lambda b: (layer_of(b + ".") or 0, b))
    n_exp = 1 + max(int(c["expert"]) for c in coverage)
    grid = [[None] * n_exp for _ in blocks]
    marks = [[""] * n_exp for _ in blocks]
    flagged = []
    for c in coverage:
        r, e = blocks.index(c["block"]), int(c["expert"])
        grid[r][e] = c.get("tokens")
        lam = c.get("lambda")
        why = []
        if not c.get("tokens"):
            marks[r][e] = "0"
            why.append("uncovered: saw no token (its layer's pooled Hessian used)")
        elif isinstance(lam, (int, float)) and lam >= SHRUNK_LAMBDA:
            marks[r][e] = "s"
            why.append(f"shrunk: lambda {lam:.2f} >= {SHRUNK_LAMBDA} on the pooled Hessian")
        if c.get("quota_met") is False:
            marks[r][e] = marks[r][e] or "q"
            why.append("quota not met")
        if why:
            flagged.append([c["block"], e, c.get("tokens"), c.get("prob_share"), lam, "; ".join(why)])
    add_plot(
        s,
        lambda: _plots.expert_heatmap(grid, blocks, marks),
        f'tokens routed to each expert (log colour scale); marked: "0" uncovered, "s" shrunk (lambda >= '
        f'{SHRUNK_LAMBDA}: mostly the pooled Hessian), "q" quota not met',
    )
    uncovered = sum(1 for c in coverage if not c.get("tokens"))
    shrunk = sum(1 for f in flagged if "shrunk" in f[-1])
    s.add(para(f"{len(coverage)} experts in {len(blocks)} MoE layers: {uncovered} uncovered, {shrunk} shrunk."))
    cols = ["block", "expert", "tokens", "prob mass", "lambda", "why marked"]
    if flagged:
        s.add(table(cols, flagged))
    s.add(
        details(
            "tokens per expert (all)",
            table(
                cols[:5],
                [[c["block"], c["expert"], c.get("tokens"), c.get("prob_share"), c.get("lambda")] for c in coverage],
            ),
        )
    )
    return s


# ------------------------------------------------------------------------------------------ activations
def activation_quant(report: dict) -> Section | None:
    """The input scales of an activation-quantized scheme and the FP8 KV-cache scales (docs/activation_quant.md)."""
    aq, kv = report.get("activation_quant"), report.get("kv_cache")
    if not aq and not kv:
        return None
    s = Section("activations", "Activation and KV-cache quantization")
    if aq:
        mods = aq.get("modules") or {}
        how = {
            "nvfp4": "per-16 E4M3 scales at run time under a static global scale per module (448 * 6 / absmax)",
            "mxfp4": "per-32 E8M0 scales at run time",
        }.get(aq.get("format"))
        if how is None:
            how = "one scale per token at run time" if aq.get("dynamic") else f"static scales ({aq.get('observer')})"
        s.add(
            para(
                f"scheme {aq.get('scheme')}: {aq.get('format')} inputs, "
                + how
                + f"; {len(mods)} modules, {len(aq.get('fallbacks') or [])} with a fallback scale (an expert no "
                "calibration token reached), "
                f"{len(aq.get('not_simulated') or [])} not simulated."
            )
        )
        fb = [[n, fmt(mods[n].get("scale")), mods[n].get("fallback")] for n in aq.get("fallbacks") or [] if n in mods]
        if fb:
            s.add(table(["module", "scale", "fallback"], fb))
        if not aq.get("dynamic") and aq.get("format") != "nvfp4":
            # the largest input scale of each role per decoder layer (experts: the largest over the block)
            by_role: dict[str, dict[int, float]] = {}
            for n, d in mods.items():
                li, sc = layer_of(n), d.get("scale")
                if li is not None and isinstance(sc, (int, float)):
                    slot = by_role.setdefault(role_of(n), {})
                    slot[li] = max(sc, slot.get(li, 0.0))
            layers = sorted({li for v in by_role.values() for li in v})
            if by_role and layers:
                groups = {r: [v.get(li, 0.0) for li in layers] for r, v in sorted(by_role.items())}
                add_plot(
                    s,
                    lambda: _plots.grouped_bars(groups, [str(li) for li in layers], "input scale", "act-scales"),
                    "static input scale (absmax / 448 for FP8, / 127.5 for INT8, or the clipped percentile) per "
                    "role and decoder layer",
                )
        if not aq.get("dynamic"):
            clip = any("clip" in d for d in mods.values())  # --act-observer mse: the kept shrink factor
            rows = [
                [n, fmt(d.get("scale")), d.get("tokens")] + ([fmt(d.get("clip"))] if clip else [])
                for n, d in mods.items()
            ]
            head = ["module", "global scale" if aq.get("format") == "nvfp4" else "scale", "tokens"]
            s.add(details("input scale per module", table(head + (["clip"] if clip else []), rows)))
    sq = report.get("smoothquant")
    if sq:  # w8a8: the SmoothQuant strength kept per smoothing group, and what it measured
        groups = sq.get("groups") or {}
        s.add(
            para(
                f"SmoothQuant {sq.get('mode')}: {sq.get('smoothed_groups', 0)} of {len(groups)} groups smoothed "
                "(alpha by the least measured int8 output error on the calibration data; - = no smoothing)."
            )
        )
        rows = []
        for norm, g in groups.items():
            errs = g.get("errors") or {}
            kept = "off" if g.get("alpha") is None else f"{g['alpha']:g}"
            rows.append(
                [norm, "-" if g.get("alpha") is None else g["alpha"], fmt(errs.get(kept)), fmt(errs.get("off"))]
            )
        s.add(table(["norm", "alpha", "output error (kept)", "output error (no smoothing)"], rows))
    if kv:
        sc = kv.get("scales") or {}
        rows = [[n, fmt(d.get("k_scale")), fmt(d.get("v_scale"))] for n, d in sc.items()]
        s.add(para(f"KV cache {kv.get('format')}: one k_scale and v_scale per layer (absmax / 448 after RoPE)."))
        groups = {w: [float(d.get(w) or 0.0) for d in sc.values()] for w in ("k_scale", "v_scale")}
        labels = [str(layer_of(n + ".")) for n in sc]
        add_plot(s, lambda: _plots.grouped_bars(groups, labels, "scale", "kv-scales"), "k/v scale per decoder layer")
        s.add(table(["attention", "k_scale", "v_scale"], rows))
    return s


# ------------------------------------------------------------------------------------------ memory
def memory(report: dict) -> Section | None:
    plan = report.get("plan")
    if not isinstance(plan, dict) or not plan.get("phases"):
        return None
    s = Section("memory", "Memory: planned vs measured")
    planned = {str(k): float(v) for k, v in plan["phases"].items()}
    if plan.get("device") not in (None, "cpu"):
        planned[f"device {plan['device']}"] = float(plan.get("peak_device") or 0)
    meas = report.get("measured") or {}
    phases = {str(k): float(v) for k, v in (meas.get("phases") or {}).items() if v}
    measured = {}
    if meas.get("peak_rss"):
        measured["process peak RSS"] = float(meas["peak_rss"])
    if meas.get("peak_device"):
        measured["device peak allocated"] = float(meas["peak_device"])
    series = (report.get("streaming") or {}).get("rss_after_layer") or None
    add_plot(
        s,
        lambda: _plots.memory(planned, phases, measured, series),
        "planned host memory by phase (calibra.jobs.plan) against the measured peaks: each phase's high-water mark "
        "(VmHWM, reset between phases) and the process's peak over the whole job",
    )
    rows = [[f"{k}: planned", _bytes(v)] for k, v in planned.items()]
    exact = meas.get("phases_exact") or {}
    rows += [
        [f"{k}: measured ({'high-water mark' if exact.get(k, True) else 'sampled, at least'})", _bytes(v)]
        for k, v in phases.items()
    ]
    rows += [[f"measured: {k}", _bytes(v)] for k, v in measured.items()]
    rows.append(["planned peak host (phase)", f"{_bytes(plan.get('peak_host'))} ({plan.get('host_phase')})"])
    rows.append(["placement", plan.get("placement")])
    s.add(table(["", "bytes"], rows))
    if not measured:
        s.add(para("No measured peak in this report (written before calibra recorded one).", "note"))
    for w in plan.get("warnings") or []:
        s.add(para(f"plan warning: {w}", "note"))
    return s


# ------------------------------------------------------------------------------------------ KV
def kv_curves_from_values(values: dict[str, list], chosen: dict[str, list]) -> tuple[dict, dict]:
    """Unexplained variance fraction vs rank per layer from the PCA eigenvalues ``values[w][layer]`` (a
    ``[heads, head_dim]`` tensor or nested list), heads averaged."""
    curves, marks = {}, {}
    for w, per_layer in values.items():
        for i, v in enumerate(per_layer):
            rows = [list(map(float, h)) for h in (v.tolist() if hasattr(v, "tolist") else v)]
            d = len(rows[0])
            fr = []
            for r in range(1, d + 1):
                fr.append(
                    statistics.fmean(
                        1.0 - sum(sorted(h, reverse=True)[:r]) / sum(h) if sum(h) > 0 else 0.0 for h in rows
                    )
                )
            name = f"{w.upper()} layer {i}"
            curves[name] = [(float(r), max(f, 1e-9)) for r, f in zip(range(1, d + 1), fr)]
            if w in chosen and i < len(chosen[w]):
                marks[name] = float(chosen[w][i])
    return curves, marks


def kv_preset(doc: dict, values: dict | None) -> list[Section]:
    model = doc.get("model") or {}
    s = Section("summary", "Summary")
    q = doc.get("quality") or {}
    rows = [
        [
            "model",
            f"{model.get('source')} ({model.get('model_type')}, {model.get('num_layers')} layers, "
            f"{model.get('num_kv_heads')} KV heads of {model.get('head_dim')}, {model.get('attention')})",
        ],
        ["job", f"kv calibrate: PCA bases for {doc.get('targets')}"],
        ["ranks", "; ".join(f"{w.upper()} {r}" for w, r in (doc.get("ranks") or {}).items())],
        ["calibration", _kv(doc.get("calibration"), skip=("fingerprint", "observer"))],
    ]
    if q.get("perplexity"):
        p = q["perplexity"]
        rows.append(["perplexity", f"{fmt(p.get('baseline'))} -> {fmt(p.get('compressed'))}"])
    if q.get("kl_divergence"):
        k = q["kl_divergence"]
        rows.append(
            ["KL divergence", f"mean {fmt(k.get('mean'))}, median {fmt(k.get('median'))}, max {fmt(k.get('max'))}"]
        )
    if q.get("memory"):
        m = q["memory"]
        rows.append(
            [
                "cache bytes",
                f"{(m.get('compressed') or {}).get('total')} of {(m.get('dense') or {}).get('total')}: "
                f"ratio {fmt(m.get('ratio'))}, saving {fmt(m.get('saving'))}",
            ]
        )
    a = doc.get("autotune")
    if a:
        v = a.get("verified") or {}
        rows.append(
            [
                "auto-tune",
                f"{a.get('metric_description')} budget {a.get('budget')}: tuned {fmt(a.get('tuned_value'))}"
                + (
                    f"; eval text {fmt(v.get('value'))} ({'within' if v.get('within_budget') else 'OVER'} budget)"
                    if v
                    else ""
                ),
            ]
        )
    rows.append(["versions", f"calibra={doc.get('calibra_version')}"])
    s.add(table(["", ""], rows))
    secs = (doc.get("calibration") or {}).get("seconds") or {}
    if secs:
        add_plot(s, lambda: _plots.time_by_stage({k: float(v) for k, v in secs.items()}), "time by stage")
    k = Section("kv", "KV: quality vs rank, chosen ranks per layer")
    ranks = doc.get("ranks") or {}
    if a and a.get("sensitivity"):
        d = doc.get("head_dim")
        curves, marks = {}, {}
        for w, per_layer in a["sensitivity"].items():
            for layer, by_rank in sorted(per_layer.items(), key=lambda t: int(t[0])):
                name = f"{w.upper()} layer {layer}"
                pts = [(float(r), float(v)) for r, v in by_rank.items()]
                if d:
                    pts.append((float(d), 0.0))  # full rank: the reference itself
                curves[name] = pts
                chosen = (ranks.get(w) or [])[int(layer)] if int(layer) < len(ranks.get(w) or []) else None
                if chosen is not None:
                    marks[name] = float(chosen)
        add_plot(
            k,
            lambda: _plots.rank_curves(curves, marks, "rank", a.get("metric_description") or a.get("metric")),
            f"measured on {(a.get('tuning') or {}).get('tokens')} tokens of calibration text, one slot at a time "
            "(the others at full rank); the chosen rank ringed",
        )
        grid = sorted({int(r) for per in a["sensitivity"].values() for x in per.values() for r in x}, reverse=True)
        trows = [
            [f"{w.upper()} layer {layer}"] + [by.get(str(r)) for r in grid]
            for w, per in a["sensitivity"].items()
            for layer, by in sorted(per.items(), key=lambda t: int(t[0]))
        ]
        k.add(table(["slot"] + [f"r={r}" for r in grid], trows))
    if values:
        curves, marks = kv_curves_from_values(values, ranks)
        add_plot(
            k,
            lambda: _plots.rank_curves(curves, marks, "rank", "variance not kept (fraction)"),
            "the PCA bases' unexplained variance fraction vs rank (calibration data, heads averaged); the chosen "
            "rank ringed",
        )
    if ranks:
        n = max(len(v) for v in ranks.values())
        add_plot(
            k,
            lambda: _plots.grouped_bars(
                {w.upper(): list(map(float, v)) for w, v in ranks.items()},
                [str(i) for i in range(n)],
                "rank",
                "kvranks",
            ),
            f"chosen rank per decoder layer (head_dim {doc.get('head_dim')})",
        )
        k.add(table(["layer"] + [w.upper() for w in ranks], [[i] + [v[i] for v in ranks.values()] for i in range(n)]))
    return [s, k]


# ------------------------------------------------------------------------------------------ statistics file
def stats_file(metadata: dict, counts: dict, kv_values: dict | None) -> list[Section]:
    s = Section("summary", "Summary")
    model = metadata.get("model") or {}
    runs = metadata.get("runs") or [{}]
    observers = sorted({k.split("/", 1)[0] for k in counts})
    rows = [
        [
            "model",
            f"{model.get('model_type')}, {model.get('num_layers')} layers (identity {str(model.get('id'))[:12]})",
        ],
        ["job", f"calibrate: observers {', '.join(observers)}; Hessian {metadata.get('hessian_dtype')}"],
        ["calibration", "; ".join(_kv(r, skip=("fingerprint", "selected_indices", "pool_fingerprint")) for r in runs)],
        ["seconds", fmt(metadata.get("seconds"))],
        ["versions", f"calibra={metadata.get('calibra_version')}"],
    ]
    s.add(table(["", ""], rows))
    out = [s]
    per = {k.split("/", 1)[1]: v for k, v in counts.items() if k.startswith("hessian/")}
    if per:
        m = Section("modules", "Samples per module")
        names = list(per)
        add_plot(
            m,
            lambda: _plots.bars_by_layer(
                [float(per[n]) for n in names],
                [str(i) for i in range(len(names))],
                "tokens behind the Hessian",
                min(range(len(names)), key=lambda i: per[names[i]]),
                "samples",
            ),
            "tokens each module's Hessian was accumulated over (x: module index, table below); the fewest in red",
        )
        least = sorted(names, key=lambda n: per[n])[:WORST_SHOWN]
        m.add(para("The modules with the fewest tokens:"))
        m.add(table(["module", "tokens"], [[n, per[n]] for n in least]))
        m.add(
            details(
                f"all {len(names)} modules",
                table(["#", "module", "tokens"], [[i, n, per[n]] for i, n in enumerate(names)]),
            )
        )
        out.append(m)
    sec = moe((metadata.get("moe") or {}).get("coverage"))
    if sec:
        out.append(sec)
    if kv_values:
        k = Section("kv", "KV: retained variance vs rank")
        curves, _ = kv_curves_from_values(kv_values, {})
        add_plot(
            k,
            lambda: _plots.rank_curves(curves, {}, "rank", "variance not kept (fraction)"),
            "unexplained variance fraction of the K/V PCA vs rank, per layer (heads averaged)",
        )
        out.append(k)
    return out
