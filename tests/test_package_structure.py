"""The package's structure rules, read from its source (nothing is imported):

- no import cycle between fastckpt's modules (imports inside functions count too: a cycle
  hidden in a function is still a cycle of concepts);
- no module uses another module's `_private` names (`mod._name` on an imported fastckpt module,
  or `from fastckpt.mod import _name`): what several modules need has a public-internal name;
- one owner per rule: the TorchScript test and the index reader are written once.
"""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "python" / "fastckpt"


def _modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text(), str(path))
    return out


def _imports(name: str, tree: ast.Module, known: set[str]):
    """(imported fastckpt module, {local alias: module}, [(private name used, line)])."""
    package = name if name in known and (PACKAGE / "/".join(name.split(".")[1:]) / "__init__.py").exists() \
        else name.rsplit(".", 1)[0]
    edges: set[str] = set()
    aliases: dict[str, str] = {}
    private: list[tuple[str, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in known:
                    edges.add(a.name)
                    if a.asname:
                        aliases[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                full = f"{base}.{a.name}"
                if full in known:  # `from fastckpt import loader`: the module
                    edges.add(full)
                    aliases[a.asname or a.name] = full
                elif base in known:
                    edges.add(base)
                    if a.name.startswith("_") and not a.name.startswith("__") and base != name:
                        private.append((f"{base}.{a.name}", node.lineno))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            module = aliases[node.value.id]
            if f"{module}.{node.attr}" not in known and module != name:
                private.append((f"{module}.{node.attr}", node.lineno))
    edges.discard(name)
    # A package's modules import it first; that is no dependency on its __init__'s own imports.
    edges -= {m for m in edges if name.startswith(m + ".")}
    return edges, private


def _graph():
    modules = _modules()
    known = set(modules)
    graph, private = {}, {}
    for name, tree in modules.items():
        graph[name], private[name] = _imports(name, tree, known)
    return graph, private


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    graph, _ = _graph()
    assert "fastckpt.loader" in graph and graph["fastckpt.loader"]  # the walk sees the package
    assert _cycles(graph) == []


def test_no_module_uses_another_modules_private_names():
    _, private = _graph()
    found = {module: uses for module, uses in private.items() if uses}
    assert found == {}


def test_the_checker_finds_cycles_and_private_uses():
    # The checks above must be able to fail.
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    tree = ast.parse("from fastckpt import loader\nfrom fastckpt.reader import _x\nloader._load_archive()\n")
    known = {"fastckpt", "fastckpt.loader", "fastckpt.reader", "fastckpt.cli"}
    edges, private = _imports("fastckpt.cli", tree, known)
    assert edges == {"fastckpt.loader", "fastckpt.reader"}
    assert sorted(private) == [("fastckpt.loader._load_archive", 3), ("fastckpt.reader._x", 2)]


def test_one_torchscript_test_and_one_index_reader():
    sources = {p.name: p.read_text() for p in sorted(PACKAGE.rglob("*.py"))}
    assert [n for n, s in sources.items() if "constants.pkl" in s] == ["_formats.py"]
    readers = sorted(n for n, s in sources.items() if "json.load" in s and "weight_map" in s)
    assert readers == ["_formats.py"]
