"""The layout docs/architecture.md describes, held by the code: packages import downwards only, no import cycles,
a thin pipeline, no file in train/ grown past what one reading takes. Static (AST), so it needs no imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("models", "data", "train", "launch", "bench")
# Who may import whom (by top-level folder, and inside train/ by sub-package): the layers of docs/architecture.md.
MAY_IMPORT = {
    "models": {"models"},
    "data": {"data", "models"},
    "train.losses": {"train.losses"},
    "train.config": {"train.config", "train.losses", "train.stages", "data", "models"},  # train.stages: registry
    "train.runtime": {"train.runtime", "train.config", "train.stages", "data", "models"},  # registry, lazily
    "train.stages": {"train.stages", "train.runtime", "train.losses", "train.config", "data", "models"},
    "train": {"train", "data", "models"},  # pipeline.py, __main__.py
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module_level: bool = False) -> set[str]:
    """Project modules `path` imports (absolute and relative): at any depth of the file, or only the statements
    that run on import (`module_level`; an import inside a function is the usual way to defer a heavy one)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text())
    typing_only = [n for n in tree.body if isinstance(n, ast.If) and ast.unparse(n.test).endswith("TYPE_CHECKING")]
    nodes = [n for n in tree.body if n not in typing_only]  # annotations only: never run, never a cycle
    for node in nodes if module_level else ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names}
    return {m for m in found if m.split(".")[0] in PACKAGES}


def _files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _layer(module: str) -> str | None:
    for layer in sorted(MAY_IMPORT, key=len, reverse=True):
        if module == layer or module.startswith(layer + "."):
            return layer
    return None


def test_layers_import_downwards_only():
    wrong = []
    for path in _files():
        layer = _layer(_module_name(path))
        if layer is None:
            continue
        for imported in _imports(path):
            if (
                _layer(imported) is not None
                and _layer(imported) not in MAY_IMPORT[layer]
                and not any(imported == allowed or imported.startswith(allowed + ".") for allowed in MAY_IMPORT[layer])
            ):
                wrong.append(f"{path.relative_to(ROOT)} imports {imported}")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles_between_modules():
    modules = {_module_name(p): p for p in _files()}
    graph = {}
    for name, path in modules.items():
        # A package's __init__ re-exporting its submodules (and they reading it) is how packages work, not a cycle.
        graph[name] = {
            m
            for m in _imports(path, module_level=True)
            if m in modules and not (m == name or m.startswith(name + ".") or name.startswith(m + "."))
        }
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_the_pipeline_stays_a_thin_loop_and_train_files_stay_readable():
    assert len((ROOT / "train" / "pipeline.py").read_text().splitlines()) < 200
    long = {
        str(p.relative_to(ROOT)): n
        for p in (ROOT / "train").rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 400
    }
    assert not long, long


def test_every_stage_is_one_file_and_one_registry_entry():
    from train.stages import STAGE_NAMES

    files = {p.stem for p in (ROOT / "train" / "stages").glob("*.py")} - {
        "__init__",
        "context",
        "module",
    }
    assert files == set(STAGE_NAMES)
    for name in STAGE_NAMES:
        source = (ROOT / "train" / "stages" / f"{name}.py").read_text()
        assert "\ndef run(ctx: Context) -> dict:" in source, name
