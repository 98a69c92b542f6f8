"""The calibra command line. Thin: it parses, calls the API, prints."""
from __future__ import annotations

import argparse
import json
import sys


def _cmd_info(args: argparse.Namespace) -> int:
    import calibra

    info = calibra.build_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"calibra {info['version']} (torch {info['torch']})")
    for name, entry in info["backends"].items():
        if entry["loaded"]:
            fams = ", ".join(entry.get("families", []))
            extra = f", {entry['threads']} threads" if "threads" in entry else ""
            print(f"  {name:5s} loaded{extra}: {fams}")
        else:
            print(f"  {name:5s} not loaded: {entry['reason']}")
    return 0


def _cmd_selftest(args: argparse.Namespace) -> int:
    from calibra.selftest import run_selftest

    return 0 if run_selftest(device=args.device, verbose=True) else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="calibra", description="Calibration-driven compression for LLMs.")
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="which native backends loaded, and why not for the others")
    info.add_argument("--json", action="store_true", help="print the full build_info() as JSON")
    info.set_defaults(fn=_cmd_info)
    st = sub.add_parser("selftest", help="run every op natively and compare it with its reference")
    st.add_argument("--device", default="cpu", help="device to test (default: cpu)")
    st.set_defaults(fn=_cmd_selftest)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
