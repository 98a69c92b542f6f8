"""Measure the tiny-moe quantize report page and take the docs' screenshot of it (docs/report.md).

    PYTHONPATH=python python tools/report_screenshot.py [--png docs/img/report-tiny-moe.png] [--loads 5]

Runs ``calibra quantize --input builtin:tiny-moe --method gptq --bits 4 --group-size 128 --samples 16`` into
a temporary folder, opens its report.html in headless Chromium (Debian's ``chromium``) ``--loads`` times,
and prints the page size and the load time (navigation start to the load event, the page's own timing;
median and max). The screenshot shows the page from the top through the per-module loss plot.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from calibra.cli import main  # noqa: E402
from tests.report.headless import Browser, find_chromium  # noqa: E402


def run() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--png", default=str(ROOT / "docs" / "img" / "report-tiny-moe.png"))
    ap.add_argument("--loads", type=int, default=5)
    ap.add_argument("--height", type=int, default=1700, help="screenshot height in CSS pixels")
    args = ap.parse_args()
    binary = find_chromium()
    if binary is None:
        sys.exit("no Chromium: apt-get install chromium (or set CALIBRA_CHROMIUM)")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        main(
            ["quantize", "--input", "builtin:tiny-moe", "--output", str(out), "--method", "gptq", "--bits", "4"]
            + ["--group-size", "128", "--samples", "16", "--no-progress"]
        )
        page = out / "report.html"
        times = []
        with Browser(binary, width=1100, height=args.height) as b:
            for _ in range(args.loads):
                times.append(b.open(page))
            errors = b.errors()
            Path(args.png).parent.mkdir(parents=True, exist_ok=True)
            b.screenshot(Path(args.png), height=args.height)
        print(f"page: {page.stat().st_size} bytes ({page.stat().st_size / 1024:.0f} KiB)")
        print(
            f"load (navigation start -> load event): median {statistics.median(times) * 1000:.0f} ms, "
            f"max {max(times) * 1000:.0f} ms over {len(times)} loads"
        )
        print(f"console errors: {len(errors)}")
        print(f"screenshot: {args.png} ({Path(args.png).stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(run())
