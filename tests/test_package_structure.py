"""The package's structure rules, read from its source (nothing is imported):

- no import cycle between fastckpt's modules (imports inside functions, and
  ``importlib.import_module("fastckpt.x")`` / ``__import__`` of a constant name, count too: a
  cycle hidden in a function is still a cycle of concepts, so no local import can dodge one);
- no module uses another module's `_private` names (`mod._name` on an imported fastckpt module,
  also spelled `fastckpt.mod._name` or `getattr(mod, "_name")`, or `from fastckpt.mod import
  _name`), nor a `_private` method of another module's classes through an instance
  (`reader._descriptor(...)`): what several modules need has a public-internal name;
- one owner per rule: the TorchScript test and the index reader are written once, and only
  `_graph` walks a loaded object graph (no other function recurses into, or keeps a stack of,
  dict / list / tuple values).
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
        if isinstance(node, ast.Call) and _dynamic_import(node) in known:
            edges.add(_dynamic_import(node))
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
        used = None
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            used = (_dotted(node.value, aliases, known), node.attr)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
              and isinstance(node.args[1].value, str) and _is_private(node.args[1].value)):
            used = (_dotted(node.args[0], aliases, known), node.args[1].value)
        if used and used[0] is not None:
            module, attr = used
            if f"{module}.{attr}" not in known and module != name:
                private.append((f"{module}.{attr}", node.lineno))
    edges.discard(name)
    # A package's modules import it first; that is no dependency on its __init__'s own imports.
    edges -= {m for m in edges if name.startswith(m + ".")}
    return edges, private


def _is_private(attr: str) -> bool:
    return attr.startswith("_") and not attr.startswith("__")


def _dynamic_import(call: ast.Call) -> str | None:
    """The module named by ``importlib.import_module("x")`` or ``__import__("x")``, else None."""
    f = call.func
    named = (isinstance(f, ast.Name) and f.id in ("__import__", "import_module")) or (
        isinstance(f, ast.Attribute) and f.attr == "import_module")
    if named and call.args and isinstance(call.args[0], ast.Constant) and isinstance(call.args[0].value, str):
        return call.args[0].value
    return None


def _dotted(node, aliases: dict[str, str], known: set[str]) -> str | None:
    """The fastckpt module an expression names (`loader`, `fastckpt.loader`), else None."""
    if isinstance(node, ast.Name):
        return aliases.get(node.id, node.id if node.id == "fastckpt" and "fastckpt" in known else None)
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value, aliases, known)
        if base is not None and f"{base}.{node.attr}" in known:
            return f"{base}.{node.attr}"
    return None


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


def _private_methods(tree: ast.Module) -> set[str]:
    """The `_private` methods (and properties) defined in the module's classes."""
    return {item.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef) for item in node.body
            if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and _is_private(item.name)}


def _defined_names(tree: ast.Module) -> set[str]:
    """Every name the module defines: functions, classes, assigned names and attributes."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            out.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            out.add(node.attr)
    return out


def _private_method_uses(modules: dict[str, ast.Module]) -> dict[str, list[tuple[str, int]]]:
    """{module: [(`_method` of another module's class called on an object, line)]}: `obj._m` where
    `_m` is a private method of a class defined elsewhere in the package and nowhere in the module."""
    owners: dict[str, set[str]] = {}
    for name, tree in modules.items():
        for method in _private_methods(tree):
            owners.setdefault(method, set()).add(name)
    found = {}
    for name, tree in modules.items():
        mine = _defined_names(tree)
        uses = [(f"{'/'.join(sorted(owners[n.attr]))}.{n.attr}", n.lineno) for n in ast.walk(tree)
                if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Load) and n.attr in owners
                and n.attr not in mine and not (isinstance(n.value, ast.Name) and n.value.id in ("self", "cls"))]
        if uses:
            found[name] = uses
    return found


def test_no_module_calls_private_methods_of_another_modules_classes():
    assert _private_method_uses(_modules()) == {}


def _walks_containers(fn: ast.FunctionDef) -> bool:
    """Whether `fn` tests for dict / list / tuple and goes down into them by itself: it calls itself,
    or pops a work list in a loop."""
    tests = any(isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "isinstance"
                and len(n.args) == 2 and {"dict", "list", "tuple"} & {x.id for x in ast.walk(n.args[1])
                                                                      if isinstance(x, ast.Name)}
                for n in ast.walk(fn))
    calls = {n.func.id if isinstance(n.func, ast.Name) else None for n in ast.walk(fn) if isinstance(n, ast.Call)}
    pops = any(isinstance(loop, ast.While) and any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                                                   and n.func.attr == "pop" for n in ast.walk(loop))
               for loop in ast.walk(fn))
    return tests and (fn.name in calls or pops)


def _graph_walks(modules: dict[str, ast.Module]) -> list[str]:
    return sorted(f"{name}.{fn.name}" for name, tree in modules.items() if name != "fastckpt._graph"
                  for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                  and _walks_containers(fn))


def test_only_graph_walks_a_loaded_object_graph():
    # A pickle builds a graph (shared references, cycles), not a tree: every walk goes through
    # fastckpt._graph, which visits each container once, iteratively and within bounds.
    assert _graph_walks(_modules()) == []


def test_the_checker_finds_dodges_private_methods_and_walks():
    known = {"fastckpt", "fastckpt.loader", "fastckpt.reader", "fastckpt.cli"}
    tree = ast.parse("import fastckpt.loader\nimport importlib\ndef f():\n    importlib.import_module('fastckpt.reader')\n"
                     "    getattr(fastckpt.loader, '_plan')\n    return fastckpt.loader._load()\n")
    edges, private = _imports("fastckpt.cli", tree, known)
    assert edges == {"fastckpt.loader", "fastckpt.reader"}
    assert sorted(private) == [("fastckpt.loader._load", 6), ("fastckpt.loader._plan", 5)]
    modules = {"fastckpt.reader": ast.parse("class R:\n    def _descriptor(self):\n        pass\n"),
               "fastckpt.cli": ast.parse("def f(r):\n    return r._descriptor()\n")}
    assert _private_method_uses(modules) == {"fastckpt.cli": [("fastckpt.reader._descriptor", 2)]}
    walks = {"fastckpt.bench.digest": ast.parse(
        "def flatten(o):\n    if isinstance(o, dict):\n        for v in o.values():\n            yield from flatten(v)\n"
        "def touch(o):\n    stack = [o]\n    while stack:\n        x = stack.pop()\n"
        "        if isinstance(x, (list, tuple)):\n            stack.extend(x)\n"),
        "fastckpt._graph": ast.parse("def walk(o):\n    return walk(o) if isinstance(o, dict) else o\n")}
    assert _graph_walks(walks) == ["fastckpt.bench.digest.flatten", "fastckpt.bench.digest.touch"]


def test_one_torchscript_test_and_one_index_reader():
    sources = {p.name: p.read_text() for p in sorted(PACKAGE.rglob("*.py"))}
    assert [n for n, s in sources.items() if "constants.pkl" in s] == ["_formats.py"]
    readers = sorted(n for n, s in sources.items() if "json.load" in s and "weight_map" in s)
    assert readers == ["_formats.py"]
