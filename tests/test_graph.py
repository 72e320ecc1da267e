"""Walks of a loaded object graph (issue 23, class 1): every surface visits each container once.

A pickle builds a graph: 40 nested ``[x, x]`` lists are 2^40 paths in under 2 KB, and a list may
hold itself. torch.load returns those in milliseconds; so must fastckpt.open, inspect, verify's
tensor names, fastckpt.load's IntegrityError message and distributed.load(keys=). The file cases
run in a subprocess under a timeout and a memory cap, so a regression fails instead of hanging.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from fastckpt import _graph
from fastckpt.errors import FormatError, LimitError

TIMEOUT_S = 60  # the whole subprocess, imports included; the walks themselves take milliseconds


# --------------------------------------------------------------------------- the walker itself (no torch)


class Leaf:
    """Stands for a tensor."""


def paths_2_to_the(n, leaf):
    x = leaf
    for _ in range(n):
        x = [x, x]
    return {"w": x}


def nested(depth, leaf):
    x = [leaf]
    for _ in range(depth):
        x = [x]
    return x


def is_leaf(x):
    return type(x) is Leaf


@pytest.mark.timeout(120)
def test_shared_lists_are_walked_once():
    leaf = Leaf()
    tree = paths_2_to_the(40, leaf)
    events = list(_graph.walk(tree, is_leaf=is_leaf))
    assert len(events) == 1 + 1 + 40 * 2  # the dict, 'w', then per level: one expanded entry, one seen
    assert [e.kind for e in events].count(_graph.SEEN) == 39
    assert _graph.flatten(tree, is_leaf) == {"w" + ".0" * 39 + ".0": leaf, "w" + ".0" * 39 + ".1": leaf}
    assert _graph.distinct_leaves(tree, is_leaf) == [leaf]
    assert _graph.without_leaves(tree, is_leaf) is _graph.DROPPED


@pytest.mark.timeout(120)
def test_a_list_holding_itself():
    leaf = Leaf()
    a = [leaf, 1]
    a.append(a)
    events = list(_graph.walk(a, is_leaf=is_leaf))
    assert [e.kind for e in events] == [_graph.CONTAINER, _graph.LEAF, _graph.LEAF, _graph.SEEN]
    assert events[-1].first.parent is None  # the top-level object
    assert _graph.flatten(a, is_leaf) == {"0": leaf}
    copy = _graph.without_leaves(a, is_leaf)
    assert copy[0] == 1 and copy[1] is copy  # the cycle is kept, the leaf left out
    d = {"x": leaf}
    d["self"] = d
    copy = _graph.without_leaves(d, is_leaf)
    assert copy == {"self": copy} and copy["self"] is copy


@pytest.mark.timeout(120)
def test_deep_nesting_uses_no_python_stack():
    leaf = Leaf()
    tree = nested(200_000, leaf)
    assert _graph.flatten(tree, is_leaf) == {".".join(["0"] * 200_001): leaf}
    assert _graph.without_leaves(tree, is_leaf) is _graph.DROPPED
    kept = _graph.without_leaves(nested(200_000, 5), is_leaf)
    depth = 0
    while isinstance(kept, list):
        kept, depth = kept[0], depth + 1
    assert (kept, depth) == (5, 200_001)


@pytest.mark.timeout(120)
def test_a_big_container_referenced_many_times_is_listed_once():
    big = {str(i): i for i in range(20_000)}
    tree = [big] * 20_000  # 2 bytes per reference in a pickle
    kinds = [e.kind for e in _graph.walk(tree)]
    assert len(kinds) == 1 + 20_000 + 20_000 and kinds.count(_graph.SEEN) == 19_999
    copy = _graph.without_leaves(tree, is_leaf)
    assert len(copy) == 20_000 and all(c is copy[0] for c in copy) and copy[0] == big


def test_output_is_bounded():
    tree = {str(i): Leaf() for i in range(1000)}
    events = list(_graph.walk(tree, max_entries=100))
    assert len(events) == 101 and events[-1].kind == _graph.TRUNCATED
    found, truncated = _graph.leaves(tree, is_leaf, max_entries=100)
    assert truncated and len(found) == 99
    with pytest.raises(LimitError, match="more than 100 entries"):
        _graph.flatten(tree, is_leaf, max_entries=100)
    long = {"k" * 1000: {"k" * 1000: Leaf()}}
    with pytest.raises(LimitError):
        _graph.flatten(long, is_leaf, max_chars=1500)
    shown = list(_graph.walk(list(range(10)), max_items=3))
    assert [e.kind for e in shown] == [_graph.CONTAINER] + [_graph.LEAF] * 3 + [_graph.MORE]
    assert shown[-1].size == 7


def test_naming_rule():
    """A leaf is named wherever it sits (tied weights); a container saved twice is one object, named once."""
    tied, other = Leaf(), Leaf()
    block = {"w": other}
    tree = {"embed": tied, "head": tied, "a": block, "b": block, "t": (tied,)}
    assert list(_graph.flatten(tree, is_leaf)) == ["embed", "head", "a.w", "t.0"]
    assert _graph.distinct_leaves(tree, is_leaf) == [tied, other]
    with pytest.raises(FormatError, match="both named 'a.b'"):
        _graph.flatten({"a.b": Leaf(), "a": {"b": Leaf()}}, is_leaf)
    assert _graph.without_leaves({"a": block, "b": block, "n": [1, tied]}, is_leaf) == {"n": [1]}
    meta = {"x": 1}
    copy = _graph.without_leaves({"a": meta, "b": meta, "t": (tied,)}, is_leaf)
    assert copy == {"a": {"x": 1}, "b": {"x": 1}} and copy["a"] is copy["b"]


# --------------------------------------------------------------------------- every surface, on files

torch = pytest.importorskip("torch")

from parity import flip_byte, save_bytes  # noqa: E402


def run_isolated(code: str, timeout_s=TIMEOUT_S, mem_gb=4) -> subprocess.CompletedProcess:
    prelude = (f"import resource; resource.setrlimit(resource.RLIMIT_AS, ({mem_gb << 30}, {mem_gb << 30}))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    try:
        return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                              timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"did not finish in {timeout_s} s (a walk of the graph as a tree?):\n{code}")


def assert_ok(result):
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("graphs")
    x = torch.arange(4.0)
    for _ in range(40):
        x = [x, x]
    data = save_bytes({"w": x, "epoch": 3})
    loop = [torch.arange(3.0), {"lr": 0.5}]
    loop.append(loop)
    deep = [torch.ones(2)]
    for _ in range(990):  # the native reader's cap is 1000 levels; Python's own stack is about as deep
        deep = [deep]
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(5000)  # the stdlib pickler recurses
    try:
        deep_data = save_bytes({"deep": deep, "n": 1})
    finally:
        sys.setrecursionlimit(limit)
    out = {"paths": data, "paths_bad_crc": flip_byte(data, "data/0", index=1), "loop": save_bytes(loop),
           "deep": deep_data}
    for name, blob in out.items():
        (root / f"{name}.pt").write_bytes(blob)
    return {name: str(root / f"{name}.pt") for name in out}


W = "w" + ".0" * 40


@pytest.mark.timeout(TIMEOUT_S + 30)
def test_open_lists_a_2_to_the_40_paths_graph(files):
    assert_ok(run_isolated(f"""
        import fastckpt
        with fastckpt.open({files['paths']!r}) as f:
            assert f.keys() == [{W!r}, {W[:-1] + '1'!r}], f.keys()
            assert f.get_tensor({W!r}).tolist() == [0.0, 1.0, 2.0, 3.0]
            assert f.metadata() == {{"epoch": 3}}, f.metadata()
        with fastckpt.open({files['paths']!r}, framework="pt") as f:
            assert f.keys() == [{W!r}, {W[:-1] + '1'!r}]
        print("ok")
    """))


@pytest.mark.timeout(TIMEOUT_S + 30)
@pytest.mark.parametrize("name", ["paths", "loop", "deep"])
def test_inspect(files, name):
    result = run_isolated(f"""
        import sys
        from fastckpt.cli import main
        sys.exit(main(["inspect", {files[name]!r}]))
    """)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert "the same object as" in result.stdout or name == "deep", result.stdout
    assert len(result.stdout) < 200_000


@pytest.mark.timeout(TIMEOUT_S + 30)
def test_open_a_list_holding_itself(files):
    assert_ok(run_isolated(f"""
        import fastckpt
        with fastckpt.open({files['loop']!r}) as f:
            assert f.keys() == ["0"], f.keys()
            meta = f.metadata()
            assert meta[0] == {{"lr": 0.5}} and meta[1] is meta, meta
        print("ok")
    """))


@pytest.mark.timeout(TIMEOUT_S + 30)
def test_deep_nesting(files):
    assert_ok(run_isolated(f"""
        import fastckpt
        from fastckpt.inspection import inspect_report
        with fastckpt.open({files['deep']!r}) as f:
            key = "deep" + ".0" * 991
            assert f.keys() == [key] and f.get_tensor(key).tolist() == [1.0, 1.0]
            assert f.metadata() == {{"n": 1}}
        assert inspect_report({files['deep']!r})["tensors"] == 1
        print("ok")
    """))


@pytest.mark.timeout(TIMEOUT_S + 30)
def test_verify_names_the_tensors_of_a_bad_record(files):
    result = run_isolated(f"""
        import sys
        from fastckpt.cli import main
        sys.exit(main(["verify", {files['paths_bad_crc']!r}]))
    """)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"storage of tensor '{W}'" in result.stderr and "Traceback" not in result.stderr, result.stderr


@pytest.mark.timeout(TIMEOUT_S + 30)
def test_load_integrity_error_names_the_tensors(files):
    assert_ok(run_isolated(f"""
        import fastckpt
        try:
            fastckpt.load({files['paths_bad_crc']!r}, mmap=False)
        except fastckpt.IntegrityError as e:
            assert {W!r} in str(e), str(e)
        else:
            raise AssertionError("loaded a corrupt record")
        print("ok")
    """))


@pytest.mark.timeout(TIMEOUT_S + 30)
def test_distributed_keys_selection(files, tmp_path):
    assert_ok(run_isolated(f"""
        import torch, torch.distributed as dist
        import fastckpt.distributed
        dist.init_process_group("gloo", init_method="file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
        try:
            got = fastckpt.distributed.load({files['paths']!r}, keys=["w"])
            x = got["w"]
            for _ in range(40):
                assert x[0] is x[1]
                x = x[0]
            assert x.tolist() == [0.0, 1.0, 2.0, 3.0] and list(got) == ["w"]
        finally:
            dist.destroy_process_group()
        print("ok")
    """))
