"""The shipped type stub (python/fastckpt/_core.pyi) says what the compiled module has: same names,
same parameters (read from pybind11's signatures), same classes and members."""

import ast
import pathlib
import re

from fastckpt import _core

STUB = pathlib.Path(__file__).resolve().parents[1] / "python" / "fastckpt" / "_core.pyi"


def _stub():
    tree = ast.parse(STUB.read_text())
    functions, classes = {}, {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            functions[node.name] = [a.arg for a in node.args.args]
        elif isinstance(node, ast.ClassDef):
            classes[node.name] = {n.name: [a.arg for a in n.args.args if a.arg != "self"]
                                  for n in node.body if isinstance(n, ast.FunctionDef)}
            # nested classes and enum values are members without parameters
            classes[node.name].update({n.name: None for n in node.body if isinstance(n, ast.ClassDef)})
            classes[node.name].update({t.id: None for n in node.body if isinstance(n, ast.Assign) for t in n.targets})
    return functions, classes


def _parameters(obj, name):
    """Parameter names from pybind11's first docstring line, `name(a: T, b: U = 0) -> R`."""
    line = (obj.__doc__ or "").split("\n")[0]
    m = re.match(rf"{re.escape(name)}\((.*)\) ->", line)
    assert m, f"no signature for {name}: {line!r}"
    names = [p.split(":")[0].strip() for p in re.split(r",\s*(?![^\[]*\])", m.group(1)) if p.strip()]
    return [n for n in names if n != "self"]


def _public(names):
    return {n for n in names if not n.startswith("_") or n == "__contains__"}


def test_module_functions_match():
    functions, classes = _stub()
    module = {n for n in dir(_core) if not n.startswith("_")}
    assert module == set(functions) | set(classes)
    for name, params in functions.items():
        assert _parameters(getattr(_core, name), name) == params, name


def test_class_members_match():
    _, classes = _stub()
    for cls_name, members in classes.items():
        cls = getattr(_core, cls_name)
        enum_fields = {"name", "value"} if hasattr(cls, "__members__") else set()  # pybind11 enums
        assert _public(vars(cls)) - {"__init__"} - enum_fields == _public(members), cls_name
        for name, params in members.items():
            member = vars(cls)[name]
            if params is None or isinstance(member, property) or name == "__contains__":
                continue
            assert _parameters(getattr(cls, name), name) == params, f"{cls_name}.{name}"
