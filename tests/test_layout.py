"""The package's dependency direction: no import cycle inside dds, and arrows point one way
(core <- models <- methods/pipeline <- training/eval <- cli/ui).

Imports are read from the source (ast), including imports inside functions: a lazy import is
still a dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "dds"

# Layer of each top-level part of the package; a module may import its own layer or lower ones.
LAYERS = {
    "dds.errors": 0, "dds.atomic": 0, "dds.progress": 0, "dds.images": 0, "dds.tokenizer": 0,
    "dds.console": 0,
    "dds.models.base": 1,  # the interface's types: schedule, conditioning, the Model protocol
    "dds.score": 2,  # pure math on those types
    "dds.models": 3,  # the families, tracing, the registry
    "dds.methods": 4, "dds.loop": 4, "dds.fast": 4, "dds.sampling": 4, "dds.pipeline": 4,
    "dds.world": 5,
    "dds.eval": 6, "dds.builtin": 6, "dds.translate": 6, "dds.training": 6,
    "dds.jobs": 6,  # editing at dataset scale: job lists, batches, shards, manifests
    "dds.demo": 7, "dds.cli": 7, "dds.commands": 7, "dds.ui": 7, "dds.__main__": 7,
}
# Within the same layer, these must not import those (evaluation never depends on training).
FORBIDDEN = {"dds.eval": ("dds.builtin", "dds.training", "dds.translate")}


def modules(src: Path = SRC) -> dict[str, Path]:
    out = {}
    for f in src.rglob("*.py"):
        parts = list(f.relative_to(src.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the dds modules it imports (longest known prefix of each imported name)."""
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        pkg = m.split(".") if f.name == "__init__.py" else m.split(".")[:-1]
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in mods:
                    name = name.rpartition(".")[0]
                if name and name not in (m, "dds"):
                    graph[m].add(name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def part_of(module: str) -> str:
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return prefix
    raise KeyError(module)


def test_the_cycle_finder_finds_a_cycle(tmp_path):
    """The check itself can fail: a two-module cycle and a lazy import are both seen."""
    pkg = tmp_path / "dds"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from dds.b import f\n")
    (pkg / "b.py").write_text("def f():\n    from dds import a\n")
    (pkg / "c.py").write_text("from . import a\n")
    assert cycles(import_graph(modules(pkg))) == [["dds.a", "dds.b"]]


def test_no_import_cycle_inside_dds():
    found = cycles(import_graph(modules()))
    assert found == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_every_module_has_a_layer():
    unknown = [m for m in modules() if m != "dds" and not any(
        m == p or m.startswith(p + ".") for p in LAYERS)]
    assert unknown == [], f"give these modules a layer in LAYERS: {unknown}"


def test_arrows_point_one_way():
    bad = []
    for m, deps in import_graph(modules()).items():
        if m == "dds":
            continue
        pm = part_of(m)
        for d in deps:
            pd = part_of(d)
            if LAYERS[pd] > LAYERS[pm] or pd in FORBIDDEN.get(pm, ()):
                bad.append(f"{m} -> {d}")
    assert bad == [], "imports against the layering: " + ", ".join(sorted(bad))


@pytest.mark.parametrize("name", ["edit", "edit_latents", "EditConfig", "load_model"])
def test_no_public_name_is_a_submodule(name):
    """`dds.edit` was once both a function and a submodule; importing the submodule replaced
    the function.  No exported name may be a module's name."""
    assert not (SRC / f"{name}.py").exists() and not (SRC / name).is_dir()
