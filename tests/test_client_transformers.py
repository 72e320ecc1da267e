"""A real client: transformers' from_pretrained reads a pytorch_model.bin through the patched torch.load."""

from __future__ import annotations

import pytest
import torch

from parity import save_bytes

import transformers  # noqa: E402,F401  (the test extra: missing, the run fails rather than skips)

import fastckpt  # noqa: E402

pytestmark = pytest.mark.client


def test_from_pretrained_bin_under_patch(tmp_path, load_calls):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=16)
    model = BertModel(config).eval()
    # transformers >= 5 saves safetensors only (safe_serialization is gone): write the .bin it still reads.
    config.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(save_bytes(model.state_dict()))

    fastckpt.patch()
    try:
        loaded = BertModel.from_pretrained(tmp_path).eval()
    finally:
        fastckpt.unpatch()
    assert load_calls, "from_pretrained did not go through fastckpt's load"
    assert any(str(a[0]).endswith("pytorch_model.bin") for a, _ in load_calls)
    expected, got = model.state_dict(), loaded.state_dict()
    assert list(got) == list(expected)
    for name in expected:
        assert torch.equal(got[name], expected[name]), name
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids).last_hidden_state, model(ids).last_hidden_state)
