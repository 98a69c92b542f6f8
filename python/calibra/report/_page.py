"""The HTML around the sections: one self-contained document (inline CSS, inline SVG, no script, no
font or image fetched from anywhere), so it opens from disk, in a mail attachment or on an air-gapped
machine, and reads the same with JavaScript off."""

from __future__ import annotations

import html
from dataclasses import dataclass, field

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0 auto; max-width: 1100px;
       padding: 1em 1.5em 3em; color: #1d1d1f; line-height: 1.45; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; }
h2 { font-size: 1.2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
nav a { margin-right: 1em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.88em; }
th, td { border: 1px solid #ddd; padding: 0.2em 0.6em; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f4f5f7; }
svg.plot { width: 100%; height: auto; display: block; margin: 0.5em 0; }
.worst { color: #c0392b; font-weight: 600; }
.note { color: #555; font-size: 0.9em; }
.callout { border-left: 4px solid #c0392b; background: #fdf2f0; padding: 0.4em 0.8em; margin: 0.6em 0; }
details { margin: 0.6em 0; }
code { font-size: 0.92em; }
"""


@dataclass
class Section:
    """One ``<section>``: an id (the test and the page's own links find it by it), a title, and body parts
    (HTML strings, already escaped or built by :func:`table`)."""

    id: str
    title: str
    parts: list[str] = field(default_factory=list)

    def add(self, part: str | None) -> None:
        if part:
            self.parts.append(part)


def esc(x) -> str:
    return html.escape(str(x), quote=True)


def para(text: str, cls: str | None = None) -> str:
    return f'<p class="{cls}">{esc(text)}</p>' if cls else f"<p>{esc(text)}</p>"


def fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e6 or abs(v) < 1e-4):
            return f"{v:.{digits - 1}e}"
        return f"{v:.{digits}g}"
    return str(v)


def table(header: list[str], rows: list[list], *, classes: list[str | None] | None = None) -> str:
    """``rows`` of plain values (escaped here); numbers right-aligned; ``classes[i]`` a CSS class for row i."""
    out = ["<table>"]
    if any(header):
        out.append("<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
    for i, row in enumerate(rows):
        cls = classes[i] if classes else None
        tr = f'<tr class="{cls}">' if cls else "<tr>"
        cells = "".join(
            f'<td class="num">{esc(fmt(v))}</td>'
            if isinstance(v, (int, float)) and not isinstance(v, bool)
            # bool is an int: say yes/no, left-aligned
            else f"<td>{esc(fmt(v))}</td>"
            for v in row
        )
        out.append(tr + cells + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def details(summary: str, body: str) -> str:
    """Collapsed content that opens without JavaScript (the ``<details>`` element is native)."""
    return f"<details><summary>{esc(summary)}</summary>\n{body}\n</details>"


def figure(svg: str, caption: str) -> str:
    return f'<figure class="plot">{svg}<figcaption class="note">{esc(caption)}</figcaption></figure>'


def document(title: str, subtitle: str, sections: list[Section]) -> str:
    nav = " ".join(f'<a href="#{esc(s.id)}">{esc(s.title)}</a>' for s in sections)
    body = "\n".join(
        f'<section id="{esc(s.id)}">\n<h2>{esc(s.title)}</h2>\n' + "\n".join(s.parts) + "\n</section>" for s in sections
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        # no network: a page that asks for nothing; the policy also keeps a browser from fetching a favicon
        "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; "
        'img-src data:">\n'
        '<link rel="icon" href="data:,">\n'
        f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f'<h1>{esc(title)}</h1>\n<p class="note">{esc(subtitle)}</p>\n<nav>{nav}</nav>\n{body}\n</body>\n</html>\n'
    )
