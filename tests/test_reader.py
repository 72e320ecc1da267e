"""fastckpt.open and load_sharded: torch-free reads compared with torch.load."""

import json
import os
import zipfile

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import ml_dtypes  # noqa: E402,F401  (the test extra: missing, the run fails rather than skips)

import fastckpt  # noqa: E402
from fastckpt.reader import flatten, numpy_dtype  # noqa: E402
from torchfree import run_without_torch  # noqa: E402

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex64, torch.complex128,
          torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool, torch.uint16, torch.uint32,
          torch.uint64, torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz,
          torch.float8_e8m0fnu]

# Reads every tensor without torch and returns its bit pattern, dtype and shape.
READ_ALL = """
import fastckpt, numpy as np
result = {}
with fastckpt.open(path, verify=verify) as f:
    for key in f.keys():
        a = f.get_tensor(key)
        result[key] = [a.dtype.name, list(a.shape), a.view(f"u{a.dtype.itemsize}").tolist() if a.dtype.num >= 256 else a.tolist() if a.dtype.kind != "c" else [a.real.tolist(), a.imag.tolist()], bool(a.flags.writeable)]
    result["__metadata__"] = repr(f.metadata())
"""


def expected(t):
    """What READ_ALL reports for a torch tensor (numpy dtype name, shape, values or bit patterns)."""
    t = t.detach()
    if t.dtype in (torch.bfloat16, torch.float16) or t.dtype.is_floating_point and t.element_size() == 1:
        bits = t.view({1: torch.uint8, 2: torch.int16}[t.element_size()]).numpy()
        values = bits.view(f"u{t.element_size()}").tolist()
        name = str(t.dtype).removeprefix("torch.")
        if t.dtype == torch.float16:
            values, name = t.numpy().tolist(), "float16"
        return [name, list(t.shape), values]
    a = t.numpy()
    values = [a.real.tolist(), a.imag.tolist()] if a.dtype.kind == "c" else a.tolist()
    return [a.dtype.name, list(t.shape), values]


def check_same(got, tensors):
    for key, t in tensors.items():
        assert got[key][:3] == expected(t), key


def sample(dtype, n=12):
    g = torch.Generator().manual_seed(1)
    if dtype == torch.bool:
        return torch.rand(n, generator=g) > 0.5
    if dtype.is_complex:
        return torch.randn(n, dtype=dtype, generator=g)
    if dtype.is_floating_point:
        return (torch.randn(n, generator=g) * 4).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), (n,), generator=g).to(dtype)


def test_every_dtype_without_torch(tmp_path):
    state = {str(d).removeprefix("torch."): sample(d).reshape(3, 4) for d in DTYPES}
    path = tmp_path / "dtypes.pt"
    torch.save(state, path)
    loaded = torch.load(path)
    got = run_without_torch(READ_ALL, path=str(path), verify=True)
    assert [k for k in got if k != "__metadata__"] == list(state)
    check_same(got, loaded)
    assert not any(v[3] for k, v in got.items() if k != "__metadata__")  # read-only views


def training_checkpoint():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3), torch.nn.Linear(3, 2))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    base = torch.arange(24.0)
    return {
        "model_state_dict": model.state_dict(),
        "optimizer": opt.state_dict(),
        "epoch": 3,
        "config": {"lr": 1e-3, "name": "run", "dims": (4, 3, 2), "flags": [True, None]},
        "views": [base, base[4:10], base.view(4, 6)[:, 1::2], base.view(4, 6).t(), torch.ones(3).expand(2, 3)],
        "param": torch.nn.Parameter(torch.ones(2, 2)),
        "bf16_t": torch.arange(12, dtype=torch.bfloat16).reshape(3, 4).t(),
        "scalar": torch.tensor(7),
        "empty": torch.empty(0, 3),
    }


def test_nested_training_checkpoint_views_and_metadata(tmp_path):
    path = tmp_path / "train.pt"
    torch.save(training_checkpoint(), path)
    loaded = torch.load(path)
    tensors = flatten(loaded, lambda x: isinstance(x, torch.Tensor))
    assert "model_state_dict.0.weight" in tensors and "optimizer.state.0.exp_avg" in tensors
    assert "views.2" in tensors
    got = run_without_torch(READ_ALL, path=str(path), verify=None)
    assert [k for k in got if k != "__metadata__"] == list(tensors)
    check_same(got, tensors)
    meta = got["__metadata__"]
    assert "'epoch': 3" in meta and "'lr': 0.001" in meta and "'dims': (4, 3, 2)" in meta and "'params': [0, 1, 2, 3, 4, 5]" in meta
    with fastckpt.open(path) as f:
        views = [f.get_tensor(f"views.{i}") for i in range(4)]
        assert all(np.shares_memory(views[0], v) for v in views[1:])  # one mapping, strided views
        assert f.get_tensor("views.4").strides == (0, 4)
        info = f.info("views.2")
        assert info["shape"] == (4, 3) and info["strides"] == (6, 2) and info["offset"] == 1
        assert info["storage_key"] == f.info("views.0")["storage_key"] and info["nbytes"] == 48
        assert f.info("param")["parameter"] and f.info("param")["requires_grad"]


def test_get_slice_reads_the_selected_elements(tmp_path):
    t = torch.arange(1000.0).reshape(100, 10)
    torch.save({"t": t, "b": t.bfloat16()}, tmp_path / "s.pt")
    with fastckpt.open(tmp_path / "s.pt") as f:
        s = f.get_slice("t")
        assert s.get_shape() == [100, 10] and s.get_dtype() == "float32"
        np.testing.assert_array_equal(s[5:7, ::3], t[5:7, ::3].numpy())
        np.testing.assert_array_equal(f.get_slice("b")[3].view(np.int16), t.bfloat16()[3].view(torch.int16).numpy())


def write_big_endian(src, dst):
    """A copy of a torch.save file as a big-endian machine writes it: 'byteorder' says big, storages swapped."""
    loaded = torch.load(src)
    itemsize = {}
    for t in flatten(loaded, lambda x: isinstance(x, torch.Tensor)).values():
        itemsize[t.untyped_storage().data_ptr()] = (t.element_size(), t.is_complex())
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        sizes = {}
        with fastckpt.open(src) as f:
            for key in f.keys():
                info = f.info(key)
                sizes[info["storage_key"]] = np.dtype(numpy_dtype(info["dtype"], key)).itemsize
                if info["dtype"].startswith("complex"):
                    sizes[info["storage_key"]] //= 2
        for item in zin.infolist():
            data = zin.read(item)
            name = item.filename.split("/", 1)[1]
            if name == "byteorder":
                data = b"big"
            elif name.startswith("data/") and sizes.get(name[5:], 1) > 1:
                data = np.frombuffer(data, f"u{sizes[name[5:]]}").byteswap().tobytes()
            zout.writestr(item.filename, data)


def test_big_endian_file_is_byte_swapped(tmp_path):
    state = {str(d).removeprefix("torch."): sample(d).reshape(3, 4) for d in DTYPES}
    state["strided"] = torch.arange(20, dtype=torch.int32).reshape(4, 5).t()
    torch.save(state, tmp_path / "le.pt")
    write_big_endian(tmp_path / "le.pt", tmp_path / "be.pt")
    got = run_without_torch(READ_ALL, path=str(tmp_path / "be.pt"), verify=True)
    check_same(got, state)  # the original values (torch itself leaves uint16/32/64 of v3 files unswapped)
    assert torch.equal(torch.load(tmp_path / "be.pt")["float32"], state["float32"])
    with fastckpt.open(tmp_path / "be.pt") as f:
        np.testing.assert_array_equal(f.get_slice("int32")[1, 2:], state["int32"][1, 2:].numpy())


def save_sharded(tmp_path, state, parts=3):
    keys = list(state)
    folder = tmp_path / "sharded"
    folder.mkdir()
    weight_map = {}
    for i in range(parts):
        name = f"pytorch_model-{i + 1:05d}-of-{parts:05d}.bin"
        torch.save({k: state[k] for k in keys[i::parts]}, folder / name)
        weight_map.update({k: name for k in keys[i::parts]})
    index = {"metadata": {"total_size": 1}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return folder


def test_sharded_open_and_load_sharded(tmp_path):
    state = {f"layer.{i}.weight": torch.randn(4, 4) for i in range(7)} | {"head.bias": torch.zeros(2).bfloat16()}
    folder = save_sharded(tmp_path, state)
    got = run_without_torch(READ_ALL, path=str(folder), verify=True)
    check_same(got, state)
    with fastckpt.open(folder / "pytorch_model.bin.index.json") as f:
        assert sorted(f.keys()) == sorted(state) and f.metadata() == {"total_size": 1}
        assert f.info("layer.1.weight")["shard"] == "pytorch_model-00002-of-00003.bin"
    merged = fastckpt.load_sharded(folder)
    expected_merge = {}
    for shard in sorted(os.listdir(folder)):
        if shard.endswith(".bin"):
            expected_merge.update(torch.load(folder / shard))
    assert list(merged) == list(expected_merge)
    assert all(torch.equal(merged[k], expected_merge[k]) for k in merged)
    assert list(fastckpt.load_sharded(folder, mmap=True)) == list(merged)


@pytest.mark.filterwarnings("ignore::UserWarning")  # quantized and ComplexHalf notices from torch
def test_unsupported_tensors_name_their_key(tmp_path):
    q = torch.quantize_per_tensor(torch.randn(4), 0.1, 0, torch.quint8)
    state = {"q": q, "sparse": torch.eye(3).to_sparse(), "c32": torch.ones(2, dtype=torch.complex32), "ok": torch.ones(2)}
    torch.save(state, tmp_path / "u.pt")
    with fastckpt.open(tmp_path / "u.pt") as f:
        assert f.keys() == ["q", "sparse", "c32", "ok"]
        for key, what in [("q", "quantized"), ("sparse", "sparse"), ("c32", "complex32")]:
            with pytest.raises(TypeError, match=f"'{key}'.*{what}"):
                f.get_tensor(key)
        np.testing.assert_array_equal(f.get_tensor("ok"), np.ones(2, np.float32))
    with fastckpt.open(tmp_path / "u.pt", framework="pt") as f:
        assert torch.equal(f.get_tensor("q").dequantize(), q.dequantize())
        assert torch.equal(f.get_tensor("c32").view(torch.float16), state["c32"].view(torch.float16))
        assert torch.equal(f.get_slice("ok")[1:], torch.ones(1))


def test_verify_names_the_tensor_of_a_bad_record(tmp_path):
    torch.save({"a": torch.zeros(16), "b": torch.ones(16)}, tmp_path / "c.pt")
    with fastckpt.open(tmp_path / "c.pt") as f:
        offset = f.info("b") and f.descriptor("b").storage.data_offset
    data = bytearray((tmp_path / "c.pt").read_bytes())
    data[offset] ^= 0xFF
    (tmp_path / "c.pt").write_bytes(data)
    with fastckpt.open(tmp_path / "c.pt") as f:
        assert f.get_tensor("b")[1] == 1  # verify=None: lazy reads are not checked
    with fastckpt.open(tmp_path / "c.pt", verify=True) as f:
        f.get_tensor("a")
        with pytest.raises(fastckpt.IntegrityError, match=r"tensor 'b'.*stored 0x[0-9a-f]+, computed"):
            f.get_tensor("b")


def test_malicious_pickle_refused_without_any_import(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            import webbrowser

            return (webbrowser.open, ("http://example.invalid",))

    torch.save({"w": torch.ones(2), "evil": Evil()}, tmp_path / "evil.pt")
    code = """
    import sys, fastckpt, fastckpt.reader
    imports = []
    sys.addaudithook(lambda event, args: imports.append(args[0]) if event == "import" else None)
    try:
        fastckpt.open(path)
        result = "opened"
    except fastckpt.UnsafeGlobalError as e:
        result = [str(e), imports, "webbrowser" in sys.modules]
    """
    message, imports, imported = run_without_torch(code, path=str(tmp_path / "evil.pt"))
    assert "GLOBAL webbrowser.open" in message
    assert imports == [] and not imported
    assert pickle  # the Evil class pickles through the standard pickler


def test_mlx_arrays(tmp_path):
    mx = pytest.importorskip("mlx.core")
    state = {"f": torch.randn(3, 4), "b": torch.randn(2, 3).bfloat16(), "t": torch.arange(6).reshape(2, 3).t()}
    torch.save(state, tmp_path / "m.pt")
    with fastckpt.open(tmp_path / "m.pt", framework="mlx") as f:
        assert isinstance(f.get_tensor("f"), mx.array)
        np.testing.assert_array_equal(np.array(f.get_tensor("f")), state["f"].numpy())
        b = f.get_tensor("b")
        assert b.dtype == mx.bfloat16
        np.testing.assert_array_equal(np.array(b.view(mx.int16)), state["b"].view(torch.int16).numpy())
        np.testing.assert_array_equal(np.array(f.get_tensor("t")), state["t"].numpy())


def test_import_and_open_without_torch(small_ckpt):
    got = run_without_torch(
        "import fastckpt\nwith fastckpt.open(path) as f:\n    result = f.keys()\n", path=str(small_ckpt))
    assert got == ["w", "b", "h", "empty"]
