"""What a pickle names, read statically (nothing is imported or run): torch-free.

Shared by the weights-only policy (Python 2 names, as pickle's fix_imports maps them) and
``inspect`` / get_unsafe_globals_in_checkpoint (every global a pickle names).
"""

from __future__ import annotations

import pickletools

_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}


def python3_name(module: str, name: str) -> tuple[str, str]:
    """A Python 2 global's Python 3 (module, name), as pickle's fix_imports maps it."""
    import _compat_pickle

    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def globals_in_pickle(data: bytes) -> list[str]:
    """Every "module.name" a pickle's GLOBAL / STACK_GLOBAL opcodes name, in first-seen order.

    STACK_GLOBAL operands are followed through the memo where they are plain
    strings; anything else is reported as "<dynamic>" rather than guessed.
    """
    found: dict[str, None] = {}
    recent: list = []  # the strings most recently pushed, for STACK_GLOBAL
    memo: dict[int, object] = {}
    for opcode, arg, _pos in pickletools.genops(data):
        name = opcode.name
        if name in ("GLOBAL", "INST"):
            module, qualname = arg.split(" ", 1)
        elif name == "STACK_GLOBAL":
            if len(recent) >= 2 and all(isinstance(x, str) for x in recent[-2:]):
                module, qualname = recent[-2], recent[-1]
            else:
                module, qualname = "<dynamic>", "<dynamic>"
        else:
            if name in _STRING_OPS:
                recent.append(arg)
            elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[arg] = recent[-1] if recent else None
            elif name == "MEMOIZE":
                memo[len(memo)] = recent[-1] if recent else None
            elif name in ("BINGET", "LONG_BINGET", "GET"):
                recent.append(memo.get(arg))
            elif name not in ("FRAME", "PROTO"):
                recent.append(None)
            continue
        module, qualname = python3_name(module, qualname)
        found[f"{module}.{qualname}"] = None
        recent.append(None)
    return list(found)


_TORCH_REBUILDS = ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                   "_rebuild_parameter_with_state", "_rebuild_qtensor", "_rebuild_sparse_tensor",
                   "_rebuild_nested_tensor", "_rebuild_meta_tensor_no_storage")
_LEGACY_STORAGES = ("Double", "Float", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool",
                    "ComplexDouble", "ComplexFloat", "QUInt8", "QInt8", "QInt32", "QUInt4x2", "QUInt2x4")
_DTYPES = ("float64", "float32", "float16", "bfloat16", "complex128", "complex64", "complex32", "int64", "int32",
           "int16", "int8", "uint64", "uint32", "uint16", "uint8", "bool", "float8_e4m3fn", "float8_e5m2",
           "float8_e4m3fnuz", "float8_e5m2fnuz", "qint8", "quint8", "qint32", "quint4x2", "quint2x4")
# Globals in torch's default weights_only allowlist (torch._weights_only_unpickler._get_allowed_globals)
# in every torch fastckpt supports; tests/test_formats.py checks each against the installed torch.
# `inspect` marks these allowed without importing torch, which it imports only for other globals.
WEIGHTS_ONLY_DEFAULTS = frozenset((
    "collections.OrderedDict", "collections.Counter", "_codecs.encode", "builtins.bytearray", "builtins.set",
    "builtins.complex", "torch.Size", "torch.device", "torch.Tensor", "torch.nn.parameter.Parameter",
    "torch.serialization._get_layout", "torch.storage.UntypedStorage", "torch._tensor._rebuild_from_type_v2",
    "torch.per_tensor_affine", "torch.per_tensor_symmetric", "torch.per_channel_affine",
    "torch.per_channel_symmetric", "torch.per_channel_affine_float_qparams",
    *(f"torch._utils.{name}" for name in _TORCH_REBUILDS),
    *(f"torch.{kind}Storage" for kind in _LEGACY_STORAGES),
    *(f"torch.{dtype}" for dtype in _DTYPES),
))
