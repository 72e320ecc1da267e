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
