"""The Python half of tools/gpu_check.sh: the dry-run validator and the summary.

    python tools/gpu_check_lib.py finish OUT_DIR [--dry-run]

reads OUT_DIR/steps.tsv (one line per step, written by gpu_check.sh) and OUT_DIR/machine.txt, writes
OUT_DIR/summary.json and prints the table. With --dry-run, each step's command (OUT_DIR/plan/NAME.argv,
NUL-separated) is first checked by :func:`validate_command` -- every path exists, every script accepts
every flag it is given (its own --help), pytest selects tests, the CMake options exist -- without running
anything on a GPU. Exit status: 1 if a step failed (or a dry-run check did), else 0.

Standard library only at import time (torch is imported by the checks that need it), so the summary is
written even where torch does not import.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import runpy
import shutil
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPU_ONLY = {"nvidia-smi", "compute-sanitizer"}  # not expected on the rehearsal machine
SANITIZER_TOOLS = {"memcheck", "racecheck", "initcheck", "synccheck"}
SANITIZER_VALUE_OPTS = {"--tool", "--error-exitcode", "--print-limit", "--racecheck-report", "--leak-check"}
# Rehearsals on the CPU of the GPU drivers (tools/gpu_check_kernels.py): option -> CPU value.
CPU_REHEARSAL = {"--device": "cpu", "--shape": "64x256"}


class CheckError(Exception):
    pass


def _is_python(prog: str) -> bool:
    return bool(re.fullmatch(r"python(3(\.\d+)?)?", os.path.basename(prog))) or prog == sys.executable


def _strip_env(argv: list[str]) -> tuple[dict, list[str]]:
    env = {}
    if argv and os.path.basename(argv[0]) == "env":
        argv = argv[1:]
        while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0]):
            k, v = argv[0].split("=", 1)
            env[k] = v
            argv = argv[1:]
    return env, argv


def _long_flags(args: list[str]) -> list[str]:
    return [a.split("=", 1)[0] for a in args if a.startswith("--") and a != "--"]


def _run_captured(fn) -> tuple[int, str]:
    """Run fn() with stdout/stderr captured; a SystemExit is its exit status."""
    buf = io.StringIO()
    rc = 0
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            r = fn()
            rc = r if isinstance(r, int) else 0
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception:  # reported as a failure with its traceback
            traceback.print_exc(file=buf)
            rc = 1
    return rc, buf.getvalue()


def _script_help(script: Path, sub: list[str]) -> str:
    def run():
        saved_argv, saved_path = sys.argv, list(sys.path)
        sys.argv = [str(script), *sub, "--help"]
        sys.path.insert(0, str(script.parent))
        try:
            runpy.run_path(str(script), run_name="__main__")
        finally:
            sys.argv, sys.path[:] = saved_argv, saved_path

    rc, out = _run_captured(run)
    if rc != 0:
        raise CheckError(f"`{script.name} {' '.join(sub)} --help` exited {rc}:\n{out[-2000:]}")
    return out


def _check_flags(flags: list[str], help_text: str, what: str) -> None:
    missing = [f for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}(?![\w-])", help_text)]
    if missing:
        raise CheckError(f"{what} does not accept {', '.join(missing)} (not in its --help)")


def _subcommand(args: list[str]) -> list[str]:
    return [args[0]] if args and not args[0].startswith("-") else []


def _check_pytest(args: list[str], notes: list[str]) -> None:
    import pytest

    skip_next = False
    for a in args:
        if skip_next:
            skip_next = False
            continue
        if a in ("-k", "-m", "-p", "--timeout", "--maxfail", "-x"):
            skip_next = a != "-x"
            continue
        if not a.startswith("-") and not (ROOT / a.split("::")[0]).exists():
            raise CheckError(f"pytest path {a} does not exist")

    class Count:
        items: list = []

        def pytest_collection_finish(self, session):
            Count.items = list(session.items)

    rc, out = _run_captured(
        lambda: pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *args], plugins=[Count()])
    )
    if rc not in (0, 5) or not Count.items:
        raise CheckError(f"pytest {' '.join(args)} selects no test (rc {rc}):\n{out[-2000:]}")
    notes.append(f"pytest selects {len(Count.items)} tests (collected here, on the CPU)")


def _check_python(args: list[str], notes: list[str]) -> None:
    if args[:2] == ["-m", "pytest"]:
        return _check_pytest(args[2:], notes)
    if args[:2] == ["-m", "calibra"]:
        from calibra import cli

        rest = args[2:]
        sub = _subcommand(rest)
        if not sub:
            raise CheckError("`python -m calibra` without a subcommand")
        rc, text = _run_captured(lambda: cli.main([*sub, "--help"]))
        if rc != 0:
            raise CheckError(f"`calibra {sub[0]} --help` exited {rc}:\n{text[-2000:]}")
        _check_flags(_long_flags(rest), text, f"calibra {sub[0]}")
        if sub == ["info"]:  # CPU-safe: run it for real
            rc, text = _run_captured(lambda: cli.main(rest))
            if rc != 0:
                raise CheckError(f"`calibra info` exited {rc}:\n{text}")
        return None
    if not args or args[0].startswith("-"):
        raise CheckError(f"unexpected python arguments {args}")
    script = ROOT / args[0]
    if not script.is_file():
        raise CheckError(f"script {args[0]} does not exist")
    rest = args[1:]
    sub = _subcommand(rest)
    _check_flags(_long_flags(rest), _script_help(script, sub), f"{args[0]} {' '.join(sub)}".strip())
    if script.name == "gpu_check_kernels.py":  # the GPU drivers run on the CPU as a rehearsal
        cpu_args = list(rest)
        for opt, value in CPU_REHEARSAL.items():
            if opt in cpu_args[:-1]:
                cpu_args[cpu_args.index(opt) + 1] = value
            elif opt == "--device":
                cpu_args += [opt, value]
        mod = runpy.run_path(str(script), run_name="gpu_check_kernels")
        rc, text = _run_captured(lambda: mod["main"](cpu_args))
        if rc != 0:
            raise CheckError(f"CPU rehearsal `{args[0]} {' '.join(cpu_args)}` exited {rc}:\n{text[-3000:]}")
        notes.append(f"CPU rehearsal `{' '.join(cpu_args)}` ok:\n{text.rstrip()}")
    return None


def _cmake_text() -> str:
    files = [ROOT / "CMakeLists.txt", *ROOT.glob("cmake/*.cmake"), *ROOT.glob("*/CMakeLists.txt")]
    files += ROOT.glob("benchmarks/*/CMakeLists.txt")
    return "\n".join(f.read_text() for f in files if f.is_file())


def _check_cmake(args: list[str], notes: list[str]) -> None:
    text = _cmake_text()
    it = iter(range(len(args)))
    for i in it:
        a = args[i]
        if a in ("-S", "-B", "--build", "-G", "--target", "-j"):
            if i + 1 >= len(args):
                raise CheckError(f"cmake {a} without a value")
            v = args[i + 1]
            next(it, None)
            if a == "-S" and not (ROOT / v / "CMakeLists.txt").is_file():
                raise CheckError(f"cmake -S {v}: no CMakeLists.txt there")
            if a == "-G" and v == "Ninja" and shutil.which("ninja") is None:
                notes.append("ninja is not on PATH here")
            if a == "--target":
                targets = [v]
                while i + len(targets) + 1 < len(args) and not args[i + len(targets) + 1].startswith("-"):
                    targets.append(args[i + len(targets) + 1])
                    next(it, None)
                for t in targets:
                    if not re.search(rf"(add_library|add_executable|pybind11_add_module)\(\s*{re.escape(t)}\s", text):
                        raise CheckError(f"cmake target {t} is not defined in the CMake files")
        elif a.startswith("-D"):
            name = a[2:].split("=", 1)[0].split(":", 1)[0]
            if name.startswith("CALIBRA_") and not re.search(rf"(option|set)\(\s*{name}\s", text):
                raise CheckError(f"cmake option {name} is not defined in the CMake files")
            if name.startswith("CMAKE_CUDA") and name not in text and name != "CMAKE_CUDA_COMPILER":
                notes.append(f"{name} is not referenced by the project's CMake files")


def validate_command(argv: list[str]) -> list[str]:
    """Check a command gpu_check.sh would run, without running it on a GPU. Returns notes; raises
    CheckError (with the reason) when a path, script, flag or option it names does not exist."""
    notes: list[str] = []
    _, argv = _strip_env(list(argv))
    if not argv:
        raise CheckError("empty command")
    prog = argv[0]
    name = os.path.basename(prog)
    if name == "compute-sanitizer":
        rest = argv[1:]
        while rest and rest[0].startswith("-"):
            opt = rest.pop(0)
            key, _, val = opt.partition("=")
            if key in SANITIZER_VALUE_OPTS and not val:
                if not rest:
                    raise CheckError(f"compute-sanitizer {key} without a value")
                val = rest.pop(0)
            if key == "--tool" and val not in SANITIZER_TOOLS:
                raise CheckError(f"compute-sanitizer has no tool {val!r}")
        if shutil.which(prog) is None and not os.path.isfile(prog):
            notes.append("compute-sanitizer is not on this machine (GPU machine only)")
        if not rest:
            raise CheckError("compute-sanitizer without a program")
        return notes + validate_command(rest)
    if name in GPU_ONLY:
        return notes
    if _is_python(prog):
        _check_python(argv[1:], notes)
        return notes
    if shutil.which(prog) is None and not (ROOT / prog).is_file():
        raise CheckError(f"{prog} is not on PATH")
    if name == "cmake":
        _check_cmake(argv[1:], notes)
    return notes


# ---------------------------------------------------------------------------------------------
# summary


def _read_steps(out: Path) -> list[dict]:
    steps = []
    path = out / "steps.tsv"
    if not path.exists():
        return steps
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        name, status, rc, seconds, log, cap, *note = line.split("\t")
        steps.append(
            {
                "name": name,
                "status": status,
                "rc": None if rc == "" else int(rc),
                "seconds": float(seconds),
                "cap_s": int(cap),
                "log": log,
                "note": note[0] if note else "",
            }
        )
    return steps


def _tail(path: str, n: int = 15) -> list[str]:
    try:
        return Path(path).read_text(errors="replace").splitlines()[-n:]
    except OSError:
        return []


def _validate_plan(out: Path, steps: list[dict]) -> None:
    for s in steps:
        argv_file = out / "plan" / f"{s['name']}.argv"
        if s["status"] != "planned" or not argv_file.exists():
            continue
        argv = argv_file.read_text().split("\0")
        argv = argv[:-1] if argv and argv[-1] == "" else argv
        lines = [f"DRY RUN -- would run (time cap {s['cap_s']} s):", "  " + " ".join(argv)]
        try:
            notes = validate_command(argv)
            s["status"], s["rc"] = "dry-run ok", 0
            lines += ["check: ok", *notes]
        except CheckError as e:
            s["status"], s["rc"] = "dry-run FAILED", 1
            lines += [f"check: FAILED: {e}"]
        except Exception as e:  # a crash of the validator is a failed check, never a pass
            s["status"], s["rc"] = "dry-run FAILED", 1
            lines += [f"check: FAILED: {type(e).__name__}: {e}"]
        Path(s["log"]).write_text("\n".join(lines) + "\n")


def finish(out: Path, dry_run: bool) -> int:
    steps = _read_steps(out)
    if dry_run:
        _validate_plan(out, steps)
    machine = {}
    mpath = out / "machine.txt"
    if mpath.exists():
        for line in mpath.read_text().splitlines():
            if "=" in line:
                k, v = line.split("=", 1)
                machine[k.strip()] = v.strip()
    failed = [s["name"] for s in steps if "FAILED" in s["status"] or s["status"] in ("failed", "timeout")]
    skipped = [s["name"] for s in steps if s["status"].startswith("skipped")]
    for s in steps:
        s["tail"] = _tail(s["log"]) if s["name"] in failed else []
    summary = {
        "dry_run": dry_run,
        "machine": machine,
        "total_seconds": round(sum(s["seconds"] for s in steps), 1),
        "failed": failed,
        "skipped": skipped,
        "steps": steps,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    w = max([len(s["name"]) for s in steps] + [4])
    print(f"\ngpu_check summary ({'dry run' if dry_run else 'GPU run'}; {out / 'summary.json'})")
    for k, v in machine.items():
        print(f"  {k}: {v}")
    print(f"  {'step':{w}s}  {'status':24s} {'rc':>4s} {'seconds':>8s}  log")
    for s in steps:
        rc = "" if s["rc"] is None else str(s["rc"])
        print(f"  {s['name']:{w}s}  {s['status']:24s} {rc:>4s} {s['seconds']:8.1f}  {os.path.relpath(s['log'], out)}")
    for s in steps:
        if s["tail"]:
            print(f"\n--- {s['name']} ({s['status']}), last lines of {s['log']}:")
            print("\n".join("    " + t for t in s["tail"]))
    ok = len(steps) - len(failed) - len(skipped)
    print(
        f"\n{ok}/{len(steps)} steps ok"
        + (f"; failed: {failed}" if failed else "")
        + (f"; skipped: {skipped}" if skipped else "")
    )
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    f = sub.add_parser("finish", help="validate a dry-run plan, write summary.json, print the table")
    f.add_argument("out", type=Path)
    f.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    return finish(args.out.resolve(), args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
