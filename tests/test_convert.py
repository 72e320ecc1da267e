"""fastckpt.convert: torch checkpoints to safetensors, checked through safetensors' own loaders."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import ml_dtypes  # noqa: E402,F401  (the test extra: missing, the run fails rather than skips)
import safetensors.torch as st_torch  # noqa: E402

import fastckpt  # noqa: E402
from fastckpt import converter  # noqa: E402
from test_reader import DTYPES, sample, save_sharded, write_big_endian  # noqa: E402
from torchfree import run_without_torch  # noqa: E402

SAFETENSORS_DTYPES = [d for d in DTYPES if d != torch.float8_e8m0fnu and d != torch.complex128]


def state_with_views():
    base = torch.arange(40.0)
    state = {str(d).removeprefix("torch."): sample(d).reshape(3, 4) for d in SAFETENSORS_DTYPES}
    state |= {"base": base, "slice": base[5:9], "strided": base.view(5, 8)[:, ::3], "t": base.view(5, 8).t(),
              "expanded": torch.ones(3).expand(2, 3), "scalar": torch.tensor(1.5), "empty": torch.empty(0, 2)}
    return state


def assert_same(got: dict, want: dict):
    assert list(got) == list(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(got[k].view(torch.uint8) if v.numel() and v.element_size() == 1 else got[k],
                           v.contiguous().view(torch.uint8) if v.numel() and v.element_size() == 1 else v), k


def test_round_trip_through_safetensors_loaders(tmp_path):
    state = state_with_views()
    torch.save(state, tmp_path / "m.pt")
    written = run_without_torch(
        "import fastckpt\nresult = fastckpt.convert(src, dst)\n", src=str(tmp_path / "m.pt"), dst=str(tmp_path / "m.safetensors"))
    assert written == [str(tmp_path / "m.safetensors")]
    assert_same(st_torch.load_file(tmp_path / "m.safetensors"), torch.load(tmp_path / "m.pt"))
    from safetensors import safe_open

    with safe_open(tmp_path / "m.safetensors", "np") as f:  # safetensors' numpy loader has no float8
        assert f.metadata() == {"format": "pt"}
        for key in ("t", "strided", "int16", "complex64", "bool"):
            np.testing.assert_array_equal(f.get_tensor(key), state[key].numpy())


def test_mlx_loads_the_output(tmp_path):
    mx = pytest.importorskip("mlx.core")
    state = {"w": torch.randn(4, 3), "b": torch.randn(3).bfloat16(), "t": torch.arange(6).reshape(2, 3).t()}
    torch.save(state, tmp_path / "m.pt")
    fastckpt.convert(tmp_path / "m.pt", tmp_path / "m.safetensors")
    got = mx.load(str(tmp_path / "m.safetensors"))
    np.testing.assert_array_equal(np.array(got["w"]), state["w"].numpy())
    np.testing.assert_array_equal(np.array(got["b"].view(mx.int16)), state["b"].view(torch.int16).numpy())
    np.testing.assert_array_equal(np.array(got["t"]), state["t"].numpy())


def test_sharded_output_and_sharded_input(tmp_path):
    state = {f"layer.{i}.weight": torch.randn(16, 16) for i in range(6)}  # 1 KiB each
    folder = save_sharded(tmp_path, state)
    out = tmp_path / "out"
    out.mkdir()
    written = fastckpt.convert(folder, out, max_shard_size="2500B")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(written) == 4 and index["metadata"]["total_size"] == 6 * 1024
    assert sorted(index["weight_map"]) == sorted(state)
    merged = {}
    for name in sorted(set(index["weight_map"].values())):
        merged |= st_torch.load_file(out / name)
    assert sorted(merged) == sorted(state) and all(torch.equal(merged[k], state[k]) for k in state)


@pytest.mark.parametrize("chunk", [None, 6], ids=["chunk", "tiny-chunks"])
def test_big_endian_source(tmp_path, monkeypatch, chunk):
    if chunk:
        monkeypatch.setattr(converter, "CHUNK_BYTES", chunk)
    state = {"f": torch.randn(3, 4), "b": torch.randn(5).bfloat16(), "i": torch.arange(6, dtype=torch.int64).reshape(2, 3).t(),
             "c": torch.randn(4, dtype=torch.complex64), "ct": torch.randn(2, 3, dtype=torch.complex64).t()}
    torch.save(state, tmp_path / "le.pt")
    write_big_endian(tmp_path / "le.pt", tmp_path / "be.pt")
    fastckpt.convert(tmp_path / "be.pt", tmp_path / "be.safetensors")
    assert_same(st_torch.load_file(tmp_path / "be.safetensors"), state)


def test_non_tensors_refused_unless_dropped(tmp_path):
    torch.save({"model": {"w": torch.ones(2)}, "epoch": 3}, tmp_path / "c.pt")
    with pytest.raises(fastckpt.CheckpointError, match="'epoch'.*--drop-non-tensors"):
        fastckpt.convert(tmp_path / "c.pt", tmp_path / "c.safetensors")
    assert not (tmp_path / "c.safetensors").exists()
    fastckpt.convert(tmp_path / "c.pt", tmp_path / "c.safetensors", drop_non_tensors=True)
    assert list(st_torch.load_file(tmp_path / "c.safetensors")) == ["model.w"]


def test_corrupt_record_fails_and_leaves_no_output(tmp_path):
    torch.save({"a": torch.zeros(64), "b": torch.ones(64)}, tmp_path / "c.pt")
    with fastckpt.open(tmp_path / "c.pt") as f:
        offset = f.descriptor("b").storage.data_offset
    data = bytearray((tmp_path / "c.pt").read_bytes())
    data[offset + 3] ^= 1
    (tmp_path / "c.pt").write_bytes(data)
    with pytest.raises(fastckpt.IntegrityError, match="tensor 'b'.*stored 0x"):
        fastckpt.convert(tmp_path / "c.pt", tmp_path / "c.safetensors")
    assert not list(tmp_path.glob("c.safetensors*"))
