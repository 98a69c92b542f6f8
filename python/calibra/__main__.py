from calibra.cli import run

raise SystemExit(run())
