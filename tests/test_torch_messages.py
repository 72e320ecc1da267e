"""A weights-only refusal carries torch.load's own text, also where torch stops earlier than the native
machine: torch's weights-only unpickler reads no FRAME (protocols 4 and 5), so it refuses those pickles
with "Unsupported operand 149" and asks for an issue to be filed — the text PyTorch's own
test_weights_only_error expects. The error class stays fastckpt's (an UnpicklingError)."""

from __future__ import annotations

import io
import pickle
import re

import pytest
import torch
from torch.testing._internal.two_tensor import TwoTensor

from parity import call, fc_load, torch_load

import fastckpt

FILE_AN_ISSUE = "file an issue with the following so that we can make `weights_only=True`"


def _saved(obj, protocol: int) -> io.BytesIO:
    f = io.BytesIO()
    torch.save(obj, f, pickle_protocol=protocol)
    return f


def _fastckpt(f, **kw):
    f.seek(0)
    return call(fc_load, f, weights_only=True, **kw)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_refusal_text_is_torchs(protocol):
    """test_weights_only_error's case: a tensor subclass that is not allowlisted."""
    f = _saved({"t": TwoTensor(torch.randn(2), torch.randn(2))}, protocol)
    ref, got = torch_load(f, weights_only=True), _fastckpt(f)
    assert isinstance(ref.exc, pickle.UnpicklingError)
    assert isinstance(got.exc, fastckpt.UnsafeGlobalError) and isinstance(got.exc, pickle.UnpicklingError)
    assert str(got.exc) == str(ref.exc)
    if protocol >= 4:  # what test_weights_only_error asserts
        assert re.search(FILE_AN_ISSUE, str(got.exc)) and "Unsupported operand 149" in str(got.exc)
    else:
        assert "add_safe_globals([torch.testing._internal.two_tensor.TwoTensor])" in str(got.exc)


def test_refusal_before_torchs_first_unread_opcode_keeps_its_own_text():
    """A protocol-3 pickle refused at its first GLOBAL, before any opcode torch does not read."""
    f = _saved({"t": TwoTensor(torch.randn(2), torch.randn(2)), "b": b"x" * 300}, 3)
    ref, got = torch_load(f, weights_only=True), _fastckpt(f)
    assert str(got.exc) == str(ref.exc) and "Unsupported operand" not in str(got.exc)


@pytest.mark.parametrize("protocol", [4, 5])
def test_what_loads_still_loads(protocol):
    """Reading every opcode is kept: only the text of a refusal follows torch."""
    f = _saved({"w": torch.arange(4.0)}, protocol)
    assert "Unsupported operand" in str(torch_load(f, weights_only=True).exc)
    assert torch.equal(_fastckpt(f).value["w"], torch.arange(4.0))
    f = _saved({"t": TwoTensor(torch.ones(2), torch.zeros(2))}, protocol)
    with torch.serialization.safe_globals([TwoTensor]):
        assert isinstance(_fastckpt(f).value["t"], TwoTensor)
