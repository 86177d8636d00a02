"""The package's structure rules (docs/architecture.md), checked from its imports so no change breaks them quietly.

- the import-linter contracts in pyproject.toml (layers, forbidden imports, independent methods);
- no import cycle between modules (grimp's graph: function-level imports included);
- `HfDeepSpeedConfig` and `deepspeed.initialize` in exactly one module (the placement service);
- function-level imports only for heavy third-party packages or command dispatch, each with its reason.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

from tests.conftest import REPO

PACKAGE = REPO / "mmtrain"
ENTRY_POINTS = ("cli.py", "__main__.py", "train.py")
"""Modules that dispatch commands: they may import first-party code where the command runs."""
LAZY_THIRD_PARTY = {"deepspeed", "transformers", "matplotlib", "bitsandbytes", "peft", "h5py", "onnx",
                    "torch.utils.tensorboard"}
"""Heavy (seconds to import) or optional packages, imported where they are needed."""


def _sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_import_contracts_hold():
    # A subprocess: import-linter reconfigures logging in the process that runs it.
    script = ("import sys; from importlinter.cli import lint_imports; "
              f"sys.exit(lint_imports(config_filename={str(REPO / 'pyproject.toml')!r}, no_cache=True))")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, f"an import-linter contract is broken (pyproject.toml):\n{proc.stdout[-6000:]}"
    assert "0 broken" in proc.stdout


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for imported in sorted(graph.find_modules_directly_imported_by(module)):
            if imported not in index:
                visit(imported)
                low[module] = min(low[module], low[imported])
            elif imported in on_stack:
                low[module] = min(low[module], index[imported])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_import_cycles():
    graph = grimp.build_graph("mmtrain", cache_dir=None)
    assert _cycles(graph) == []


def test_a_cycle_is_found():
    """The cycle finder itself: a two-module cycle added to the real graph is reported."""
    graph = grimp.build_graph("mmtrain", cache_dir=None)
    graph.add_import(importer="mmtrain.config.paths", imported="mmtrain.engine.placement")
    assert any({"mmtrain.config.paths", "mmtrain.engine.placement"} <= set(c) for c in _cycles(graph))


def _uses(tree: ast.AST, predicate) -> bool:
    return any(predicate(node) for node in ast.walk(tree))


def _is_hf_deepspeed_config(node: ast.AST) -> bool:
    return (isinstance(node, ast.Name) and node.id == "HfDeepSpeedConfig") or (
        isinstance(node, ast.alias) and node.name == "HfDeepSpeedConfig")


def _is_deepspeed_initialize(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "initialize" and isinstance(node.value, ast.Name)
            and node.value.id == "deepspeed")


@pytest.mark.parametrize("predicate", [_is_hf_deepspeed_config, _is_deepspeed_initialize],
                         ids=["HfDeepSpeedConfig", "deepspeed.initialize"])
def test_model_placement_lives_in_one_module(predicate):
    users = [_module_name(p) for p in _sources() if _uses(ast.parse(p.read_text()), predicate)]
    assert users == ["mmtrain.engine.placement"]


def _function_level_imports(tree: ast.Module):
    """Import statements inside functions (not module level, not `if TYPE_CHECKING:`)."""
    for function in ast.walk(tree):
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(function):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    yield node


def _imported_module(node: ast.Import | ast.ImportFrom) -> str:
    if isinstance(node, ast.ImportFrom):
        return "." * node.level + (node.module or "")
    return node.names[0].name


def test_function_level_imports_are_heavy_packages_or_dispatch_with_a_reason():
    """The reason is a comment at the end of the import or on the line above it (or above the run of
    import lines it belongs to)."""
    problems = []
    for path in _sources():
        text = path.read_text()
        lines = text.splitlines()
        tree = ast.parse(text)
        import_lines = {line for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                        for line in range(node.lineno, node.end_lineno + 1)}
        for node in _function_level_imports(tree):
            module = _imported_module(node)
            where = f"{path.relative_to(REPO)}:{node.lineno} `{ast.unparse(node)}`"
            first_party = module.startswith(("mmtrain", "."))
            if first_party and path.name not in ENTRY_POINTS:
                problems.append(f"{where}: a first-party import inside a function outside a command entry point")
            elif not first_party and not any(module == lazy or module.startswith(lazy + ".")
                                             for lazy in LAZY_THIRD_PARTY):
                problems.append(f"{where}: {module} is not a heavy package; import it at module level")
            above = node.lineno - 1
            while above in import_lines and "#" not in lines[above - 1]:
                above -= 1
            reason = lines[above - 1].strip() if above >= 1 else ""
            if "#" not in lines[node.end_lineno - 1] and "#" not in reason:
                problems.append(f"{where}: no reason given (a comment on the line above or at the end)")
    assert problems == []
