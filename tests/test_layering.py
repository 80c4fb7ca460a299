"""The house has no circles: packages are layered and the core is pure JAX.

Layers, bottom up (docs/ARCHITECTURE.md, "Packages"):

* ``mnemosyne_core`` — imports no other first-party package, and never grpc, protobuf or ray;
* ``mnemosyne_registry`` (gRPC client + generated code) and ``workers`` — import the core only;
* ``service`` — may import everything below it.

The graphs are read from the source with :mod:`ast` (every import statement, also those inside
functions), so a lazy import that points the wrong way fails here as well as an eager one.
``mnemosyne_core.loading`` reaches the registry client by name through ``importlib`` on a
``grpc://`` URI only; that is checked in a fresh interpreter below.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("mnemosyne_core", "mnemosyne_registry", "workers", "service")
ALLOWED = {  # package -> first-party packages it may import
    "mnemosyne_core": set(),
    "mnemosyne_registry": {"mnemosyne_core"},
    "workers": {"mnemosyne_core"},
    "service": {"mnemosyne_core", "mnemosyne_registry", "workers"},
}
CORE_FORBIDDEN_THIRD_PARTY = ("grpc", "grpc_health", "grpc_reflection", "google", "ray")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> list[str]:
    """Absolute names an import statement may load (``from a import b`` may load ``a.b``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        parts = module.split(".")
        if not is_package:
            parts.pop()
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([base] if base else []))
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def _module_scope_imports(tree: ast.Module):
    """Import statements that run when the module is imported (not those inside functions/classes)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            for field in ("body", "orelse", "finalbody"):
                stack.extend(getattr(node, field, []) or [])
            for handler in getattr(node, "handlers", []):
                stack.extend(handler.body)


def _import_graph(*, module_scope_only: bool) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(first-party module -> first-party modules it imports, module -> third-party top-level names)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    external: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        nodes = (_module_scope_imports(tree) if module_scope_only
                 else (n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))))
        deps, ext = set(), set()
        for node in nodes:
            for target in _targets(name, path.name == "__init__.py", node):
                if target.split(".")[0] not in PACKAGES:
                    ext.add(target.split(".")[0])
                    continue
                while target and target not in modules:  # `from pkg import function` names pkg
                    target = target.rpartition(".")[0]
                if target and target != name:
                    deps.add(target)
        graph[name], external[name] = deps, ext
    return graph, external


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a closed path ``[a, b, …, a]``, or None if it is acyclic."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for succ in sorted(graph.get(node, ())):
            if state.get(succ) == 1:
                return path[path.index(succ):] + [succ]
            if succ not in state and (cycle := visit(succ)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_find_cycle_finds_one_and_only_one_when_there_is_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"x"}}) == ["x", "x"]


def test_import_scanner_sees_relative_lazy_and_guarded_imports():
    tree = ast.parse("from . import b\nif X:\n    import c.d\ndef f():\n    from ..e import g\n")
    names = [t for n in _module_scope_imports(tree) for t in _targets("p.q.m", False, n)]
    assert sorted(names) == ["c.d", "p.q", "p.q.b"]  # f()'s import is not module scope
    lazy = [t for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 2
            for t in _targets("p.q.m", False, n)]
    assert lazy == ["p.e", "p.e.g"]


def test_packages_are_layered_even_counting_lazy_imports():
    graph, _ = _import_graph(module_scope_only=False)
    wrong = sorted(
        f"{module} imports {dep}" for module, deps in graph.items() for dep in deps
        if dep.split(".")[0] != module.split(".")[0] and dep.split(".")[0] not in ALLOWED[module.split(".")[0]]
    )
    assert wrong == []
    packages = {p: {d.split(".")[0] for m, ds in graph.items() if m.split(".")[0] == p for d in ds} - {p}
                for p in PACKAGES}
    assert find_cycle(packages) is None
    assert packages["mnemosyne_registry"] == {"mnemosyne_core"}  # the client depends on the core


def test_no_import_cycle_between_modules():
    graph, _ = _import_graph(module_scope_only=True)
    assert len(graph) > 50 and "mnemosyne_core.checkpoint" in graph  # the scan found the tree
    assert find_cycle(graph) is None


def test_core_imports_no_grpc_protobuf_or_ray_anywhere():
    _, external = _import_graph(module_scope_only=False)
    bad = sorted(f"{m} imports {x}" for m, xs in external.items() if m.split(".")[0] == "mnemosyne_core"
                 for x in xs if x in CORE_FORBIDDEN_THIRD_PARTY)
    assert bad == []


def test_checkpoint_is_the_file_format_only():
    graph, _ = _import_graph(module_scope_only=False)
    assert graph["mnemosyne_core.checkpoint"] <= {"mnemosyne_core", "mnemosyne_core.checkpoint_format"} | {
        "mnemosyne_core.mnemosyne", "mnemosyne_core.baselines"}  # the config classes it can decode
    source = (ROOT / "mnemosyne_core" / "checkpoint.py").read_text()
    assert "grpc" not in source and "mnemosyne_registry" not in source


def test_importing_the_core_and_loading_a_file_import_no_grpc_ray_or_client(tmp_path):
    code = f"""
import importlib, json, pkgutil, sys
import jax
import mnemosyne_core as mn
from mnemosyne_core import checkpoint
from mnemosyne_core.baselines import LSTMConfig, init_lstm_theta
for info in pkgutil.walk_packages(mn.__path__, "mnemosyne_core."):
    try:
        importlib.import_module(info.name)
    except ModuleNotFoundError:  # optional extras (gymnax, brax) may be absent
        pass
path = {str(tmp_path / "opt.msgpack")!r}
checkpoint.save(path, init_lstm_theta(jax.random.key(0), LSTMConfig()), LSTMConfig())
mn.load(path)
roots = {{name.split(".")[0] for name in sys.modules}}
print(json.dumps(sorted(roots & {set(CORE_FORBIDDEN_THIRD_PARTY) | {'mnemosyne_registry', 'service', 'workers'}!r})))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_a_registry_uri_imports_the_client_only_then():
    pytest.importorskip("grpc")
    code = """
import json, sys
import mnemosyne_core as mn
from mnemosyne_registry import RegistryClientError
before = "grpc" in sys.modules
try:
    mn.load("grpc://127.0.0.1:1/none@latest")  # nothing listens on port 1
except RegistryClientError as exc:
    err = exc.code
print(json.dumps([before, "grpc" in sys.modules, "mnemosyne_registry.client" in sys.modules, err]))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNEMOSYNE_REGISTRY")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         env=env, timeout=120)
    before, after, client, err = json.loads(out.stdout.strip().splitlines()[-1])
    assert (before, after, client) == (False, True, True)
    assert err == "UNAVAILABLE"
