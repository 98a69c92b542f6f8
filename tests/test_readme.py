"""Every `calibra ...` command in README.md's code blocks runs, with exit status 0 (issue 16).

The commands are taken from the README's ```bash blocks: every line that starts with `calibra` (or
`python -m calibra`), joined over trailing backslashes, with any `# comment` removed. Install and test
lines (`pip ...`, `pytest ...`, `tools/...`) are not run. Every command runs as written; the commands of
the section "One example per verb" also run with the other built-in model in place of the one they name,
so every verb's example is shown to work on both `builtin:tiny-llama` and `builtin:tiny-moe`. (The
Quickstart quotes tiny-llama's numbers, so it names tiny-llama only.)
The commands of one model run in order in one temporary folder, because later commands read what earlier
ones wrote (eval reads the quantized model).

Runs offline, as `sys.executable -m calibra` with the calibra this test imported (installed, or the tree
on PYTHONPATH).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
MODELS = ("builtin:tiny-llama", "builtin:tiny-moe")
VERB_SECTION = "One example per verb"
TIMEOUT_S = 900  # one command; a quiet 2-core machine needs seconds


def readme_commands(text: str | None = None, section: str | None = None) -> list[str]:
    """The README's calibra commands, in order (one string per command); only those under the ``## section``
    heading when ``section`` is given."""
    text = README.read_text(encoding="utf-8") if text is None else text
    if section is not None:
        parts = re.split(r"^## (.*)$", text, flags=re.M)
        text = "".join(body for head, body in zip(parts[1::2], parts[2::2]) if head.strip() == section)
    commands: list[str] = []
    for block in re.findall(r"^```(?:bash|sh|shell|console)\n(.*?)^```", text, flags=re.S | re.M):
        pending = ""
        for raw in block.splitlines():
            line = raw.rstrip()
            if pending:
                line = pending + " " + line.strip()
                pending = ""
            if line.endswith("\\"):
                pending = line[:-1].rstrip()
                continue
            line = line.strip()
            if line.startswith("$ "):
                line = line[2:]
            if not (line.startswith("calibra ") or line.startswith("python -m calibra ")):
                continue
            words = shlex.split(line, comments=True)
            commands.append(shlex.join(words))
    return commands


def for_model(command: str, model: str) -> str:
    """``command`` with every built-in model name replaced by ``model``."""
    return re.sub(r"builtin:tiny-(?:llama|moe)", model, command)


def _env() -> dict:
    import calibra

    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TQDM_DISABLE="1")
    # the same calibra in the subprocess, whatever its working directory (PYTHONPATH=python is relative)
    root = str(Path(calibra.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def test_readme_has_an_example_for_every_verb():
    examples = readme_commands(section=VERB_SECTION)
    verbs = {shlex.split(c)[1] if c.startswith("calibra ") else shlex.split(c)[3] for c in examples}
    assert {"info", "selftest", "calibrate", "quantize", "prune", "eval", "inspect", "kv"} <= verbs, verbs
    kv = {shlex.split(c)[2] for c in examples if c.startswith("calibra kv ")}
    assert {"calibrate", "eval"} <= kv, kv


def test_parser_joins_continuations_and_drops_comments():
    text = "```bash\n# a comment\npip install .\ncalibra eval --model x \\\n    --max-tokens 8  # perplexity\n```\n"
    assert readme_commands(text) == ["calibra eval --model x --max-tokens 8"]


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_readme_commands_run(model, tmp_path):
    env = _env()
    failures = []
    # as written (the model they name) on the first model; the verb examples, substituted, on the other
    commands = readme_commands() if model == MODELS[0] else readme_commands(section=VERB_SECTION)
    for command in commands:
        if command.startswith("calibra "):
            argv = [sys.executable, "-m", "calibra", *shlex.split(command)[1:]]
        else:
            argv = [sys.executable, *shlex.split(command)[1:]]
        argv = [for_model(a, model) for a in argv]
        r = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
        if r.returncode != 0:
            tail = (r.stdout + r.stderr).strip().splitlines()[-8:]
            failures.append(f"{shlex.join(argv[2:])!s} -> exit {r.returncode}\n    " + "\n    ".join(tail))
    assert not failures, "README commands that failed on " + model + ":\n" + "\n".join(failures)
