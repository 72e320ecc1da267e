"""What a rank asked for (``keys=``, ``slices=``) and what it gets: the byte spans it needs, and the
result built from its file images with the normal loader."""

from __future__ import annotations

import bisect
import collections
import pathlib

import torch

from fastckpt import _formats, _graph, _native, loader
from fastckpt.distributed.schedule import merged


def chosen(all_keys, keys) -> list:
    """The keys selected by `keys` (None: all; a predicate; a list), in checkpoint order."""
    all_keys = list(all_keys)
    if keys is None:
        return all_keys
    if callable(keys):
        return [k for k in all_keys if keys(k)]
    wanted = set(keys)
    missing = wanted.difference(all_keys)
    if missing:
        raise KeyError(f"requested key(s) not in the checkpoint: {sorted(map(str, missing))[:8]}")
    return [k for k in all_keys if k in wanted]


def state_dict(obj, what: str):
    if not isinstance(obj, dict):
        raise TypeError(f"keys=/slices= need a checkpoint whose top-level object is a dict; {what} holds a "
                        f"{type(obj).__name__}")
    return obj


def _slice_of(key, value, slices):
    if slices is None or not isinstance(value, torch.Tensor):
        return None
    return slices(key, tuple(value.shape))


def select(obj, keys, slices):
    """`obj` with only the chosen keys, and sliced tensors cloned (the whole object without either)."""
    if keys is None and slices is None:
        return obj
    obj = state_dict(obj, "it")
    out = collections.OrderedDict() if isinstance(obj, collections.OrderedDict) else {}
    for k in chosen(obj, keys):
        value, s = obj[k], _slice_of(k, obj[k], slices)
        if s is not None:
            with torch.no_grad():
                value = value[s].clone()
        out[k] = value
    return out


def _keep_on_cpu(storage, location):
    return storage


def load_image(archive, map_location, opts, keep_on_cpu=frozenset()):
    """The object in a file image (an archive over memory every wanted byte has reached), as fastckpt.load
    makes it; storages are views of the image (their CRCs were checked when they were read)."""
    return loader.load_archive(archive, map_location, opts["pickle_module"], weights_only=opts["weights_only"],
                               mmap=True, verify=False, threads=opts["threads"],
                               pickle_load_args=dict(opts["pickle_load_args"]), keep_on_cpu=keep_on_cpu)


def _base_address(archive) -> int:
    whole = archive.whole()
    return torch.frombuffer(whole, dtype=torch.uint8).data_ptr() if len(whole) else 0


def tensors(value):
    """The tensors in `value`, each visited once (shared or cyclic references included)."""
    return _graph.distinct_leaves(value, lambda v: isinstance(v, torch.Tensor))


def wanted_spans(file: dict, image, keys, slices, opts) -> list:
    """The byte ranges of the storages (or slices of them) this rank asked for, found by unpickling
    data.pkl over the metadata alone: storages are views of the image, where their bytes will land."""
    archive = _native.Archive.from_buffer(image)
    obj = state_dict(load_image(archive, _keep_on_cpu, opts), file["path"])
    base = _base_address(archive)
    storage_end = {start: start + size for _, start, size, _, storage in file["records"] if storage}
    spans = []
    for key in chosen(obj, keys):
        value = obj[key]
        s = _slice_of(key, value, slices)
        for tensor in tensors(value):
            if tensor.layout is not torch.strided or tensor.is_nested:  # no single storage span: take them all
                return merged([start, end] for start, end in storage_end.items())
            storage = tensor.untyped_storage()
            if storage.nbytes() == 0:
                continue
            start = storage.data_ptr() - base
            if s is None:
                spans.append([start, storage_end[start]])
                continue
            view = tensor[s]
            if view.numel():
                first = view.storage_offset() * view.element_size()
                last = first + sum((n - 1) * st for n, st in zip(view.shape, view.stride())) * view.element_size()
                spans.append([start + first, start + last + view.element_size()])
    return merged(spans)


def wanted_shards(plan: dict, keys) -> list:
    names = {plan["weight_map"][k] for k in chosen(plan["weight_map"], keys)}
    return [[[0, file["size"]]] if name in names else [] for name, file in zip(plan["shards"], plan["files"])]


def unwanted_keys(file: dict, wanted: list) -> frozenset:
    """The storage keys this rank did not ask for (never received: zero pages): the load's storage plan
    leaves them as CPU views whatever map_location says, so they are not copied to a device."""
    ends = [end for _, end in wanted]
    keys = set()
    for name, start, size, _, storage in file["records"]:
        j = bisect.bisect_right(ends, start)  # the first wanted range ending after the record starts
        if storage and size and not (j < len(wanted) and wanted[j][0] < start + size):
            keys.add(name[len("data/"):])
    return frozenset(keys)


def assemble(plan, images, wanted, map_location, keys, slices, partial: bool, opts):
    """This rank's result from its file images."""
    if plan["kind"] == "file":
        archive = _native.Archive.from_buffer(images[0])
        unwanted = unwanted_keys(plan["files"][0], wanted[0]) if partial else frozenset()
        return select(load_image(archive, map_location, opts, unwanted), keys, slices)
    index = _formats.ShardIndex(pathlib.Path(plan["index"]), plan["weight_map"], None)
    merged_state = {}
    for name, file, image, want in zip(plan["shards"], plan["files"], images, wanted):
        if not want:
            continue
        shard = load_image(_native.Archive.from_buffer(image), map_location, opts)
        _formats.check_shard(index, name, shard)
        merged_state.update(shard)
    return select(merged_state, keys, slices)
