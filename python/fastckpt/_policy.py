"""The unpickling policy: weights_only resolved once per call, the contexts the native pickle
machine asks, and torch's messages.

The native builder (csrc/bindings/unpickler_bindings.cc) reads a context once, into its C++
Policy, through this protocol:

- ``encoding``: str; ``permissive``: bool, pickle's semantics (any global, any callable, the
  file's own errors pass through) — else torch's weights_only rules;
- ``resolve_global(module, name)``; ``newobj(cls, args[, kwargs])``; ``build(obj, state)``;
  ``reduce(func, args, resolved)`` (weights_only: callables not named by GLOBAL, and those in
  ``checked_callables``); ``settable_mappings``: types whose SETITEM(S) run as a dict's;
- ``persistent_load(pid)``: storages the plan leaves to Python; ``storage_dtype``, ``dtype_bits``,
  ``dlpack_dtype``: dtype facts; ``rebuild_tensor_v2/_v3``, ``rebuild_qtensor``,
  ``rebuild_tensor``: the functions whose calls are made (or checked) natively;
- ``message(text)``: the text of an UnpicklingError as torch.load words it.

Everything here mirrors torch 2.13's ``torch.load`` and ``torch._weights_only_unpickler``.
"""

from __future__ import annotations

import functools
import inspect
import os
import pickle
import re
import sys
import warnings
from collections import Counter, OrderedDict

import torch
from torch import _weights_only_unpickler as _wo
from torch.serialization import UNSAFE_MESSAGE, StorageType

from fastckpt import _native
from fastckpt._storages import Storages
from fastckpt.inspection import python3_name
from fastckpt.errors import LimitError, MetadataError, UnsafeGlobalError

_TRUE_VALUES = ("1", "y", "yes", "true")


def _env_flag(name: str) -> bool:
    """TORCH_FORCE_(NO_)WEIGHTS_ONLY_LOAD read as the installed torch.load reads it."""
    value = os.getenv(name, "0")
    return (value.lower() if _torch_lowercases_env_flags() else value) in _TRUE_VALUES


@functools.cache
def _torch_lowercases_env_flags() -> bool:
    """Whether torch.load lower-cases those variables first (torch 2.13 does, 2.4-2.11 do not). It
    reads them inline, so no torch function says: its source does (without one, as 2.13)."""
    try:
        return '"TORCH_FORCE_WEIGHTS_ONLY_LOAD", "0").lower()' in inspect.getsource(torch.serialization.load)
    except (OSError, TypeError):
        return True
DOCS_MESSAGE = (  # as torch.load appends it (a local there)
    "\n\nCheck the documentation of torch.load to learn more about types accepted by default with "
    "weights_only https://pytorch.org/docs/stable/generated/torch.load.html."
)

def resolve_weights_only(weights_only, pickle_module):
    """torch.load's rules for weights_only and its environment variables: (weights_only, pickle_module),
    resolved once per call (the warning, when due, is given here)."""
    not_set = weights_only is None
    if not_set:
        weights_only = torch.serialization._default_to_weights_only(pickle_module)
    force_wo = _env_flag("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    force_no_wo = _env_flag("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    if force_wo and force_no_wo:
        raise RuntimeError(
            "Only one of `TORCH_FORCE_WEIGHTS_ONLY_LOAD` or `TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD` "
            "should be set, but both were set."
        )
    if force_wo:
        weights_only = True
    elif force_no_wo and not_set:
        warnings.warn(
            "Environment variable TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD detected, since the"
            "`weights_only` argument was not explicitly passed to `torch.load`, forcing weights_only=False.",
            UserWarning,
            stacklevel=3,
        )
        weights_only = False
    if weights_only:
        if pickle_module is not None:
            raise RuntimeError("Can not safely load weights when explicit pickle_module is specified")
    elif pickle_module is None:
        pickle_module = pickle
    return weights_only, pickle_module


def weights_only_message(message: str) -> str:
    """The text torch.load puts around a weights-only unpickling error."""
    if re.search(r"GLOBAL (\S+) was not an allowed global by default.", message):
        return (
            "Weights only load failed. This file can still be loaded, to do so you have two options, "
            "\033[1mdo those steps only if you trust the source of the checkpoint\033[0m. "
            f"\n\t(1) {UNSAFE_MESSAGE}\n\t(2) Alternatively, to load with `weights_only=True` please check "
            "the recommended steps in the following error message.\n\tWeightsUnpickler error: " + message + DOCS_MESSAGE
        )
    if re.search(r"(\S+) must be (\S+) to load", message):
        return f"Weights only load failed. {message}\n {UNSAFE_MESSAGE}\n"
    text = f"Weights only load failed. {UNSAFE_MESSAGE}\n"
    if not re.search(r"whose module (\S+) is blocked", message):
        text += (
            "Please file an issue with the following so that we can make "
            "`weights_only=True` compatible with your use case: WeightsUnpickler error: "
        )
    return text + "\n\n" + message + DOCS_MESSAGE


_BLOCKED_MODULES = ("sys", "os", "posix", "nt")
# weights_only: the most bytes an allowlisted constructor (bytearray(N)) may be asked for by
# an integer from the file; torch.save never writes such calls (storages come by persistent id).
MAX_CONSTRUCTED_BYTES = 64 << 20
_NJT_NAMES = (
    "torch.nested._internal.nested_tensor.NestedTensor",
    "torch.nested._internal.nested_tensor._rebuild_njt",
    "torch._dynamo.decorators._DimRange",
)
_DTENSOR_NAMES = (
    "torch.distributed.device_mesh.DeviceMesh",
    "torch.distributed.tensor._dtensor_spec.DTensorSpec",
    "torch.distributed.tensor._dtensor_spec.TensorMeta",
    "torch.distributed.tensor.DTensor",
    "torch.distributed.tensor.placement_types.Partial",
    "torch.distributed.tensor.placement_types.Replicate",
    "torch.distributed.tensor.placement_types.Shard",
)


def _torch_class_mapping(module, name):
    """What torch.load's find_class does before pickle's: (StorageType for a legacy storage name, module)."""
    if type(name) is str and "Storage" in name:
        try:
            return StorageType(name), module
        except KeyError:
            pass
    return None, {"torch.tensor": "torch._tensor"}.get(module, module)


class _Context:
    """What every ctx gives the native builder: storages, dtype facts, the rebuild functions it makes natively."""

    rebuild_tensor_v2 = staticmethod(torch._utils._rebuild_tensor_v2)
    rebuild_tensor_v3 = staticmethod(torch._utils._rebuild_tensor_v3)
    rebuild_qtensor = staticmethod(torch._utils._rebuild_qtensor)
    rebuild_tensor = staticmethod(torch._utils._rebuild_tensor)  # legacy: (storage, offset, size, stride)

    def __init__(self, storages: Storages, encoding: str):
        self.encoding = encoding
        self.storage_dtype = storages.storage_dtype
        self.dtype_bits = storages.dtype_bits
        self.dlpack_dtype = storages.dlpack_dtype
        self.persistent_load = storages.persistent_load

    @staticmethod
    def message(text: str) -> str:
        return text


class FullContext(_Context):
    """weights_only=False with the stdlib pickle module: pickle's own semantics, torch's class mapping."""

    permissive = True

    def __init__(self, storages: Storages, encoding: str, protocol: int):
        super().__init__(storages, encoding)
        self._protocol = protocol

    def resolve_global(self, module: str, name: str):
        # torch's UnpicklerWrapper.find_class, then pickle.Unpickler.find_class
        storage_type, module = _torch_class_mapping(module, name)
        if storage_type is not None:
            return storage_type
        sys.audit("pickle.find_class", module, name)
        if self._protocol < 3:  # pickle.Unpickler's fix_imports=True
            module, name = python3_name(module, name)
        __import__(module, level=0)
        if self._protocol < 4:
            return getattr(sys.modules[module], name)
        obj = sys.modules[module]
        for part in name.split("."):  # qualified names, from protocol 4 on
            obj = getattr(obj, part)
        return obj

    @staticmethod
    def newobj(cls, args, kwargs=None):
        return cls.__new__(cls, *args, **(kwargs or {}))

    @staticmethod
    def build(inst, state):
        setstate = getattr(inst, "__setstate__", None)
        if setstate is not None:
            setstate(state)
        else:
            _set_state(inst, state, intern=True)


def _set_state(inst, state, *, intern: bool):
    """pickle's BUILD for an object without __setstate__: a dict state, or (dict, slot state)."""
    slotstate = None
    if isinstance(state, tuple) and len(state) == 2:
        state, slotstate = state
    if state:
        if intern:  # as pickle.Unpickler.load_build
            inst_dict = inst.__dict__
            for k, v in state.items():
                inst_dict[sys.intern(k) if type(k) is str else k] = v
        else:  # as torch's weights-only unpickler
            inst.__dict__.update(state)
    if slotstate:
        for k, v in slotstate.items():
            setattr(inst, k, v)


def _check_set_state(tensor, state) -> None:
    """A legacy ``set_(source, offset, size, stride)`` state must address only bytes of its source.

    Every storage fastckpt makes is non-resizable, so torch would refuse to grow one; this says
    what is wrong before torch is asked, and also covers storages made by allowlisted calls.
    """
    if not isinstance(state, tuple) or len(state) != 4:
        return  # set_() and set_(source) cannot leave their source; other arities torch refuses
    source, offset, size, stride = state
    if isinstance(source, torch.Tensor):
        nbytes = source.untyped_storage().nbytes()
    elif isinstance(source, torch.storage.TypedStorage):
        nbytes = source._untyped_storage.nbytes()  # not .nbytes(): it warns that TypedStorage is deprecated
    elif isinstance(source, torch.UntypedStorage):
        nbytes = source.nbytes()
    else:
        raise MetadataError(f"set_ state names a {type(source).__name__}, not a storage or tensor")
    try:
        size, stride, offset = [int(x) for x in size], [int(x) for x in stride], int(offset)
    except (TypeError, ValueError, OverflowError):
        raise MetadataError(f"set_ state has malformed offset/size/stride: {state[1:]!r}") from None
    _native.check_tensor_in_storage(offset, size, stride, tensor.element_size() * 8, nbytes)


def _uninitialised_constructors():
    """Allowlisted classes whose calls with sizes return uninitialised memory (dense tensors, storages)."""
    dense = [c for c in torch._tensor_classes if "sparse" not in c.__module__]
    return (torch.Tensor, *dense, torch.storage.TypedStorage, torch.UntypedStorage)


class WeightsOnlyContext(_Context):
    """The ctx of a weights_only load: torch's allowlist, read once per load, and its rules for
    REDUCE, NEWOBJ and BUILD (torch/_weights_only_unpickler.py), plus caps on what the file may size."""

    permissive = False
    settable_mappings = (OrderedDict, Counter)
    message = staticmethod(weights_only_message)

    def __init__(self, storages: Storages, encoding: str):
        super().__init__(storages, encoding)
        self._allowed = _wo._get_allowed_globals()
        self._user = _wo._get_user_allowed_globals()
        # torch tests membership with `in` over these values (== semantics: a bound classmethod
        # made by an allowlisted getattr equals the allowlisted one).
        self._allowed_values = list(self._allowed.values()) + list(self._user.values())
        self._uninitialised = _uninitialised_constructors()
        # The callables reduce() must see even when GLOBAL named them (others are called directly).
        self.checked_callables = (bytearray, *self._uninitialised,
                                  *(c for c in torch._tensor_classes if "sparse" in c.__module__))

    def resolve_global(self, module: str, name: str):
        module, name = python3_name(module, name)
        full_path = f"{module}.{name}"
        if module in _BLOCKED_MODULES:
            raise UnsafeGlobalError(f"Trying to load unsupported GLOBAL {full_path} whose module {module} is blocked.")
        if full_path in self._allowed:
            return self._allowed[full_path]
        if full_path in self._user:
            return self._user[full_path]
        if full_path in _NJT_NAMES:
            raise UnsafeGlobalError("``torch.nested`` and ``torch._dynamo`` must be imported to load nested jagged tensors (NJTs)")
        if full_path in _DTENSOR_NAMES:
            raise UnsafeGlobalError("``torch.distributed.tensor`` must be imported to load DTensors")
        if full_path.startswith("builtins."):
            full_path = full_path[len("builtins.") :]
        raise UnsafeGlobalError(
            f"Unsupported global: GLOBAL {full_path} was not an allowed global by default. "
            f"Please use `torch.serialization.add_safe_globals([{full_path}])` or the "
            f"`torch.serialization.safe_globals([{full_path}])` context manager to allowlist this global "
            "if you trust this class/function."
        )

    def _check_allocation(self, func, args, kwargs) -> None:
        """Refuse calls that would allocate memory sized by an integer from the file."""
        if func is bytearray and args and isinstance(args[0], int) and args[0] > MAX_CONSTRUCTED_BYTES:
            raise LimitError(f"bytearray({args[0]}) asks for more than the {MAX_CONSTRUCTED_BYTES}-byte cap")
        if isinstance(func, type) and issubclass(func, self._uninitialised) and func is not torch.nn.Parameter:
            sized = not args or any(isinstance(a, (int, torch.Size)) for a in args)
            if sized or any(isinstance(v, (int, torch.Size)) for v in kwargs.values()):
                raise UnsafeGlobalError(
                    f"{func.__module__}.{func.__qualname__} called with sizes {args!r} would return uninitialised "
                    "memory sized by the file; only calls given data are allowed"
                )

    def _validate_later(self, func, result):
        if func in torch._tensor_classes and "sparse" in func.__module__:  # as torch
            torch._utils._sparse_tensors_to_validate.append(result)

    def reduce(self, func, args, resolved: bool):
        """REDUCE on a callable not named by GLOBAL, or one of `checked_callables`; `resolved`: func
        came from GLOBAL, so it is allowed."""
        if not resolved and func not in self._allowed_values:
            message = f"Trying to call reduce for unrecognized function {func}"
            if hasattr(func, "__self__"):
                message += f" which belongs to {func.__self__}"
            raise UnsafeGlobalError(message)
        self._check_allocation(func, args, {})
        result = func(*args)
        self._validate_later(func, result)
        return result

    def newobj(self, cls, args, kwargs=None):
        kwargs = kwargs or {}
        if cls is torch.nn.Parameter:
            return torch.nn.Parameter(*args, **kwargs)
        if cls not in self._allowed_values:
            raise UnsafeGlobalError(
                f"Can only create new object for nn.Parameter or classes allowlisted via `add_safe_globals` but got {cls}"
            )
        self._check_allocation(cls, args, kwargs)
        result = cls.__new__(cls, *args, **kwargs)
        self._validate_later(cls, result)
        return result

    def build(self, inst, state):
        kind = type(inst)
        if kind is torch.Tensor:  # legacy serialization: set_ with the file's metadata, bounds-checked
            _check_set_state(inst, state)
            inst.set_(*state)
        elif kind is torch.nn.Parameter:  # Tensor.__setstate__: a 4-item state is the same set_
            _check_set_state(inst, state)
            inst.__setstate__(state)
        elif kind is OrderedDict:
            if not isinstance(state, dict):
                raise UnsafeGlobalError(f"BUILD of an OrderedDict needs a dict state, got {type(state)}")
            inst.__dict__.update(state)
        elif kind in self._allowed_values:
            if hasattr(inst, "__setstate__"):
                inst.__setstate__(state)
            else:
                _set_state(inst, state, intern=False)
        else:
            raise UnsafeGlobalError(
                f"Can only build Tensor, Parameter, OrderedDict or types allowlisted via `add_safe_globals`, but got {kind}"
            )


def make_full_unpickler(pickle_module, data_file, storages: Storages, **pickle_load_args):
    """weights_only=False: the caller's pickle module, with torch's class mapping and our storages."""

    class UnpicklerWrapper(pickle_module.Unpickler):  # type: ignore[name-defined]
        def find_class(self, mod_name, name):
            storage_type, mod_name = _torch_class_mapping(mod_name, name)
            return storage_type if storage_type is not None else super().find_class(mod_name, name)

    unpickler = UnpicklerWrapper(data_file, **pickle_load_args)
    unpickler.persistent_load = storages.persistent_load
    return unpickler


