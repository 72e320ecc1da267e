"""fastckpt.open's shapes and indexes (issue 23, class 6): get_slice indexes as numpy does, degenerate
shapes torch.load accepts come back as torch gives them or as a CheckpointError naming the key, and
a safetensors look-alike's header is never read past safetensors' own cap (100 MB)."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import fastckpt
from fastckpt._formats import MAX_SAFETENSORS_HEADER
from fastckpt.inspection import identify
from parity import P, rezip, save_bytes


@pytest.fixture(scope="module")
def views(tmp_path_factory):
    g = torch.Generator().manual_seed(3)
    base = torch.randn(4, 5, 6, generator=g)
    state = {
        "cube": base,
        "t": base[1].t(),  # a transposed view: strides not C order
        "step": base[:, ::2, 1:],  # a strided slice with an offset
        "vec": torch.arange(7, dtype=torch.int64),
        "scalar": torch.tensor(2.5),
        "flags": torch.tensor([[True, False, True]]),
    }
    path = tmp_path_factory.mktemp("views") / "views.pt"
    torch.save(state, path)
    return str(path), {k: v.numpy() for k, v in state.items()}


def random_index(rng: random.Random, ndim: int):
    """A basic numpy index: ints (negative too), slices (negative steps too), None and at most one Ellipsis."""
    parts, used, ellipsis = [], 0, False
    while used < ndim or rng.random() < 0.2:
        r = rng.random()
        if r < 0.15:
            parts.append(None)
            continue
        if r < 0.25 and not ellipsis:
            parts.append(Ellipsis)
            ellipsis = True
            continue
        if used >= ndim:
            break
        if r < 0.45:
            parts.append(rng.randrange(-1, 2))  # sizes are >= 2 where ints land... or IndexError, as numpy
        else:
            start, stop = rng.choice([None, -7, -2, -1, 0, 1, 3, 9]), rng.choice([None, -9, -3, -1, 0, 2, 5, 9])
            parts.append(slice(start, stop, rng.choice([None, 1, 2, 3, -1, -2, -3])))
        used += 1
        if rng.random() < 0.2:
            break
    if len(parts) == 1 and rng.random() < 0.5:
        return parts[0]
    return tuple(parts)


@pytest.mark.parametrize("framework", ["numpy", "pt"])
def test_get_slice_indexes_like_numpy(views, framework):
    path, arrays = views
    rng = random.Random(23)
    checked = 0
    with fastckpt.open(path, framework=framework) as f:
        for _ in range(600):
            key = rng.choice(sorted(arrays))
            want = arrays[key]
            index = random_index(rng, want.ndim)
            steps = [p.step for p in (index if isinstance(index, tuple) else (index,)) if isinstance(p, slice)]
            if framework == "pt" and any(s is not None and s < 0 for s in steps):
                continue  # torch has no negative steps (ValueError, as tensor[index] raises)
            try:
                expected = want[index]
            except IndexError:
                with pytest.raises(IndexError):
                    f.get_slice(key)[index]
                continue
            got = f.get_slice(key)[index]
            got = got.numpy() if framework == "pt" else got
            assert got.shape == expected.shape and got.dtype == expected.dtype, (key, index)
            np.testing.assert_array_equal(got, expected, err_msg=f"{key}[{index!r}]")
            checked += 1
    assert checked > 300


def test_newaxis_is_not_the_whole_tensor(views):
    path, arrays = views
    with fastckpt.open(path) as f:
        assert f.get_slice("vec")[None].shape == (1, 7)
        assert f.get_slice("scalar")[None].shape == (1,)
        assert f.get_slice("cube")[..., None, ::-1].shape == (4, 5, 1, 6)
        np.testing.assert_array_equal(f.get_slice("t")[::-1, None], arrays["t"][::-1, None])
        assert f.get_tensor("vec").shape == (7,)


def _degenerate(size, stride, numel=4) -> bytes:
    return rezip(save_bytes(torch.arange(numel, dtype=torch.float32)),
                 replace={"data.pkl": P.program(P.EMPTY_DICT + P.str("w") + P.tensor(
                     size=size, stride=stride, pid=P.pid(numel=numel)) + P.SETITEM)})


@pytest.mark.parametrize("size, stride", [((0, 2**62), (2**62, 1)), ((2**62, 0), (1, 1)), ((0, 2**63 - 1), (1, 1))])
def test_empty_shapes_numpy_cannot_hold(tmp_path, size, stride):
    path = tmp_path / "d.pt"
    path.write_bytes(_degenerate(size, stride))
    assert torch.load(path)["w"].shape == size
    with fastckpt.open(path) as f:
        assert f.get_slice("w").get_shape() == list(size)
        for read in (lambda: f.get_tensor("w"), lambda: f.get_slice("w")[None]):
            with pytest.raises(fastckpt.MetadataError, match="tensor 'w' of shape .*framework=\"pt\""):
                read()
    with fastckpt.open(path, framework="pt") as f:
        assert f.get_tensor("w").shape == size
        assert f.get_slice("w")[None].shape == (1, *size)


@pytest.mark.parametrize("size, stride", [((1, 1), (2**62, 2**62)), ((1, 1, 1), (0, 2**63 - 1, 5)), ((3, 1), (1, 2**62))])
def test_size_one_dims_with_huge_strides(tmp_path, size, stride):
    path = tmp_path / "d.pt"
    path.write_bytes(_degenerate(size, stride))
    want = torch.load(path)["w"]
    for framework in ("numpy", "pt"):
        with fastckpt.open(path, framework=framework) as f:
            got = f.get_tensor("w")
            assert tuple(got.shape) == size
            np.testing.assert_array_equal(np.asarray(got), want.numpy())
            step = -1 if framework == "numpy" else 1  # torch has no negative steps
            np.testing.assert_array_equal(np.asarray(f.get_slice("w")[None, ..., ::step]), want.numpy()[None, ..., ::step])


def test_safetensors_look_alike_header_is_capped(tmp_path):
    """A 1 GiB declared header (a sparse file) is never read: identify refuses from the 8-byte length alone."""
    path = tmp_path / "big.safetensors"
    declared = 1 << 30
    with open(path, "wb") as f:
        f.write(declared.to_bytes(8, "little") + b'{"a":')
        f.truncate(8 + declared)
    assert declared > MAX_SAFETENSORS_HEADER
    assert identify(path)[0] == "unknown"
    limit = 256 << 20  # far less than the header: reading it whole would fail with MemoryError
    code = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, ({limit} + (1 << 30), {limit} + (1 << 30)))
        from fastckpt.cli import main
        sys.exit(main([sys.argv[1], {str(path)!r}]))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    for command in ("verify", "inspect"):
        result = subprocess.run([sys.executable, "-c", code, command], capture_output=True, text=True, timeout=120,
                                env=env)
        assert result.returncode == 2 and "not a torch checkpoint" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize("header", [b"[" * 100_000, b"{" + b"\xff" * 10, b'{"a": ' + b"[" * 100_000 + b"}"])
def test_safetensors_look_alike_with_bad_json(tmp_path, header):
    path = tmp_path / "x.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    kind, what = identify(path)  # named for what it looks like, never a JSON/Unicode/Recursion error
    assert kind in ("unknown", "safetensors"), what
