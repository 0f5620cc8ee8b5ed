"""The package layout keeps its promises: one folder per layer, data flowing one way, no cycles, small modules.

* Importing the client (`from hss_ee_hf import HSSEEForCausalLM`) in a fresh interpreter loads no server module and
  no EE-transform module.
* Importing the server's modules loads no client or pipeline module. `hss_ee_hf/__init__.py` registers the client
  with transformers (the documented `import hss_ee_hf` contract), so this test stands a bare package in for it and
  imports `hss_ee_hf.server` alone: what is loaded then is exactly what the server's own imports pull in.
* No import cycle between project modules, counting imports inside functions.
* No module over 400 lines.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "hss_ee_hf"
CONVERSION = ROOT / "conversion"
LAYERS = ("ring", "ee", "artifacts", "transport", "server", "client", "pipelines", "hub", "cli", "gateway")
MAX_LINES = 400


def _loaded(code: str) -> list[str]:
    """The `hss_ee_hf` modules a fresh interpreter has loaded after running `code`."""
    script = (
        code + "\nimport json, sys\nprint(json.dumps(sorted(m for m in sys.modules if m.startswith('hss_ee_hf'))))"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


# Stands in a bare package for hss_ee_hf/__init__.py, so `import hss_ee_hf.server` runs only the server's imports.
_BARE_PACKAGE = f"""
import sys, types
pkg = types.ModuleType("hss_ee_hf")
pkg.__path__ = [{str(PACKAGE)!r}]
sys.modules["hss_ee_hf"] = pkg
"""


def _under(modules: list[str], *layers: str) -> list[str]:
    return [m for m in modules if m.split(".")[1:2] and m.split(".")[1] in layers]


def test_client_import_loads_no_server_and_no_ee_module() -> None:
    loaded = _loaded("from hss_ee_hf import HSSEEForCausalLM")
    assert "hss_ee_hf.client.modeling" in loaded  # the import really happened
    assert _under(loaded, "server", "ee") == []


def test_server_import_loads_no_client_and_no_pipeline_module() -> None:
    loaded = _loaded(_BARE_PACKAGE + "import hss_ee_hf.server\nfrom hss_ee_hf.server.engine import StageEngine")
    assert "hss_ee_hf.server.servicer" in loaded and "hss_ee_hf.server.engine" in loaded
    assert _under(loaded, "client", "pipelines", "ee", "cli") == []


def test_layering_check_fails_when_a_server_module_imports_the_client(tmp_path: Path) -> None:
    # The check above must be able to fail: a copy of the package whose server imports the client is caught.
    import shutil

    copy = tmp_path / "hss_ee_hf"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    engine = copy / "server" / "engine.py"
    engine.write_text(engine.read_text(encoding="utf-8") + "\nfrom ..client import stage_client  # noqa\n")
    code = _BARE_PACKAGE.replace(repr(str(PACKAGE)), repr(str(copy))) + "import hss_ee_hf.server"
    script = code + "\nimport sys\nprint([m for m in sys.modules if m.startswith('hss_ee_hf.client')])"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert "hss_ee_hf.client.stage_client" in out.stdout


def _module_name(path: Path) -> str:
    if path.is_relative_to(CONVERSION):
        parts = ("hss_ee_conversion", *path.relative_to(CONVERSION).with_suffix("").parts)
    else:
        parts = ("hss_ee_hf", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    files = [*PACKAGE.rglob("*.py"), *CONVERSION.rglob("*.py")]
    return {_module_name(p): p for p in files if "protos" not in p.parts}


def _imports(name: str, path: Path, modules: set[str]) -> set[str]:
    """Project modules `path` imports anywhere (top level or inside functions), resolved to the module itself."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [f"{stem}.{alias.name}" for alias in node.names] + [stem]
        else:
            continue
        for target in targets:
            if target in modules:
                found.add(target)
    return found - {name}


def _graph() -> dict[str, set[str]]:
    sources = _sources()
    modules = set(sources)
    graph = {}
    for name, path in sources.items():
        # Package __init__ files are facades that re-export (hss_ee_hf/__init__ registers the public API): an import
        # of `pkg.mod` is an edge to `pkg.mod`, not to the facade, so facades are left out of the cycle check.
        if path.name != "__init__.py":
            graph[name] = {m for m in _imports(name, path, modules) if not sources[m].name == "__init__.py"}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles_between_project_modules() -> None:
    graph = _graph()
    assert len(graph) > 40 and any(graph.values())
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_cycle_check_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize(
    ("importer", "forbidden"),
    [
        ("client", ("server", "ee", "pipelines", "cli", "gateway")),
        ("server", ("client", "ee", "pipelines", "cli", "hub")),
        ("transport", ("client", "server", "ee", "pipelines", "cli", "hub")),
        ("ring", ("artifacts", "transport", "server", "client", "ee", "pipelines", "cli", "hub")),
        ("artifacts", ("transport", "server", "client", "ee", "pipelines", "cli", "hub")),
        ("ee", ("transport", "server", "client", "pipelines", "cli", "hub")),
        ("hub", ("server", "client", "ee", "pipelines", "cli")),
        ("pipelines", ("server", "ee", "cli", "gateway")),
        ("gateway", ("server", "ee", "cli")),
    ],
)
def test_data_flows_one_way(importer: str, forbidden: tuple[str, ...]) -> None:
    graph = _graph()
    wrong = {
        (module, target)
        for module, targets in graph.items()
        if module.split(".")[1:2] == [importer]
        for target in targets
        if target.split(".")[1:2] and target.split(".")[1] in forbidden and target.startswith("hss_ee_hf.")
    }
    assert not wrong


def test_every_layer_is_a_folder_and_no_module_is_too_long() -> None:
    for layer in LAYERS:
        assert (PACKAGE / layer / "__init__.py").is_file(), layer
    flat = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert flat == ["__init__.py", "errors.py"]
    long = {
        p.relative_to(ROOT).as_posix(): n
        for p in _sources().values()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long
