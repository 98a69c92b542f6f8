import fnmatch
import json
import os
from collections import defaultdict
from pathlib import Path

import pytest

# Tests never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# ---------------------------------------------------------------------------------------------
# Skip accounting (what .ci/run uses so that CI cannot stay green while skipping what it must check).
#
#   CALIBRA_SKIP_REPORT=FILE.json    write every skipped / xfailed test (node id, reason) to FILE.json
#   CALIBRA_REQUIRED_TESTS=FILE      fail the session when a test matched by FILE was skipped (or matched
#                                    no test at all); FILE has one entry per line, '#' comments:
#                                    a node-id glob (tests/x.py::test_a*) or a folder ending in '/'
#
# With either variable set, the terminal summary lists the skips grouped by reason.

_ROOT = Path(__file__).resolve().parents[1]
_skipped: list[dict] = []  # {"nodeid", "reason", "kind": "test" | "module"}
_xfailed: list[dict] = []
_seen: set[str] = set()  # every test that reported a setup/call outcome


def _reason(report) -> str:
    lr = report.longrepr
    if isinstance(lr, tuple) and len(lr) == 3:
        r = str(lr[2])
    else:
        r = str(lr)
    return r.removeprefix("Skipped: ").strip()


def _short(reason: str) -> str:  # one line of at most 160 characters (a build failure's reason holds its log)
    line = reason.splitlines()[0] if reason else ""
    return line[:157] + "..." if len(line) > 160 or "\n" in reason.strip() else line


def pytest_collectreport(report):
    if report.skipped:  # a module-level skip: every test in it is skipped without a line of its own
        _skipped.append({"nodeid": report.nodeid, "reason": _reason(report), "kind": "module"})


def pytest_runtest_logreport(report):
    _seen.add(report.nodeid)
    if not report.skipped:
        return
    if hasattr(report, "wasxfail"):
        _xfailed.append({"nodeid": report.nodeid, "reason": str(report.wasxfail)})
    else:
        _skipped.append({"nodeid": report.nodeid, "reason": _reason(report), "kind": "test"})


def _required_entries(path: str) -> list[str]:
    p = Path(path)
    if not p.is_absolute():
        p = _ROOT / p
    return [s for line in p.read_text().splitlines() if (s := line.split("#", 1)[0].strip())]


def _matches(entry: str, nodeid: str, module: bool) -> bool:
    if entry.endswith("/"):
        return nodeid.startswith(entry)
    if module:  # a skipped module holds the entry's tests when the entry's file part matches it
        return fnmatch.fnmatchcase(nodeid, entry.split("::", 1)[0])
    return fnmatch.fnmatchcase(nodeid, entry)


def _violations() -> list[str]:
    path = os.environ.get("CALIBRA_REQUIRED_TESTS")
    if not path:
        return []
    out = []
    entries = _required_entries(path)
    for s in _skipped:
        hit = [e for e in entries if _matches(e, s["nodeid"], s["kind"] == "module")]
        if hit:
            out.append(
                f"required {'module' if s['kind'] == 'module' else 'test'} skipped: {s['nodeid']} "
                f"({_short(s['reason'])}) [required by {hit[0]}]"
            )
    for e in entries:  # a required entry that names nothing (renamed, deleted, deselected) is a failure too
        if not any(_matches(e, n, False) for n in _seen) and not any(
            _matches(e, s["nodeid"], s["kind"] == "module") for s in _skipped
        ):
            out.append(f"required entry matched no test: {e}")
    return out


def pytest_sessionfinish(session, exitstatus):
    report = os.environ.get("CALIBRA_SKIP_REPORT")
    if report:
        Path(report).write_text(
            json.dumps({"skipped": _skipped, "xfailed": _xfailed, "required_violations": _violations()}, indent=1)
        )
    if _violations() and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if not (os.environ.get("CALIBRA_SKIP_REPORT") or os.environ.get("CALIBRA_REQUIRED_TESTS")):
        return
    tr = terminalreporter
    by_reason = defaultdict(list)
    for s in _skipped:
        by_reason[_short(s["reason"])].append(s)
    tr.write_sep("=", f"skips by reason ({len(_skipped)} skipped, {len(_xfailed)} xfailed)")
    for reason, items in sorted(by_reason.items(), key=lambda kv: -len(kv[1])):
        mods = sum(s["kind"] == "module" for s in items)
        what = f"{len(items) - mods} tests" + (f" + {mods} whole modules" if mods else "")
        tr.write_line(f"{what:>24}: {reason}")
    for x in _xfailed:
        tr.write_line(f"{'xfail':>24}: {x['nodeid']}: {_short(x['reason'])}")
    bad = _violations()
    if bad:
        tr.write_sep("=", f"REQUIRED TESTS NOT RUN ({len(bad)})", red=True)
        for b in bad[:20]:
            tr.write_line(b, red=True)
        if len(bad) > 20:
            tr.write_line(f"... and {len(bad) - 20} more (CALIBRA_SKIP_REPORT's JSON lists them all)", red=True)
    elif os.environ.get("CALIBRA_REQUIRED_TESTS"):
        tr.write_line(f"required tests: none skipped ({os.environ['CALIBRA_REQUIRED_TESTS']})")
