"""python/calibra/_cpu.pyi matches the built calibra._cpu: the same public names, and each function the
same parameters (names where the binding names them, else the count), so the stub cannot drift."""

import ast
import re
from pathlib import Path

import pytest

import calibra
from calibra import _native

STUB = Path(calibra.__file__).with_name("_cpu.pyi")


def _stub() -> tuple[dict[str, list[str]], set[str]]:
    """({function: parameter names}, other public names) declared by the stub."""
    functions, others = {}, set()
    for node in ast.parse(STUB.read_text()).body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            a = node.args
            functions[node.name] = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
        elif isinstance(node, ast.AnnAssign):
            others.add(node.target.id)
    return functions, {n for n in others if not n.startswith("_")}


def _runtime_parameters(fn) -> list[str]:
    """Parameter names from pybind11's signature line ``name(a: T, b: T) -> R``."""
    line = fn.__doc__.splitlines()[0]
    inner = line[line.index("(") + 1 : line.rindex(") ->")]
    return re.findall(r"(?:^|, )(\w+):", inner)


@pytest.fixture(scope="module")
def cpu():
    module = _native.load("cpu")
    if module is None:
        pytest.skip(f"calibra._cpu is not built: {_native.load_failure('cpu')}")
    return module


def test_stub_declares_exactly_the_public_names(cpu):
    functions, others = _stub()
    public = {n for n in dir(cpu) if not n.startswith("_")}
    assert set(functions) | others == public


def test_stub_parameters_match_the_bindings(cpu):
    functions, _ = _stub()
    for name, params in functions.items():
        runtime = _runtime_parameters(getattr(cpu, name))
        if all(re.fullmatch(r"arg\d+", p) for p in runtime):  # unnamed in the binding: positional, by count
            assert len(params) == len(runtime), name
        else:
            assert params == runtime, name
