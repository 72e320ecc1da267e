"""Walks of a loaded object graph: the one way every surface looks inside what a pickle built.

A pickle builds a graph, not a tree: memo references share objects (40 nested ``[x, x]`` lists
are 2^40 paths in 1.6 KB) and containers may hold themselves. So every walk here visits each
container once (by ``id``), in tree order (depth first, keys in order), on an explicit stack
(never Python's), and stops after a bounded number of entries with a :data:`TRUNCATED` event.

Naming rule (``fastckpt.open``, ``inspect``, ``verify``'s tensor names): a leaf (a tensor) is
named at every place it sits in an expanded container, so tied weights keep both names as
``state_dict()`` gives them; a container reached again (saved under two names, or a cycle) is
one object, as ``torch.load`` returns it, and is expanded under its first path only.

Torch-free: what is a container or a leaf is the caller's ``children`` / ``is_leaf``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from fastckpt.errors import FormatError, LimitError

# event kinds
LEAF = "leaf"  # not a container (or the caller's leaf): obj
CONTAINER = "container"  # a container expanded here; its entries follow: obj, size (entries it has)
SEEN = "seen"  # a container already expanded at `first` (shared or a cycle): obj, first
MORE = "more"  # after a container's shown entries: size = how many were not shown (max_items)
TRUNCATED = "truncated"  # the walk stopped here: more than max_entries entries or max_chars of paths

MAX_ENTRIES = 1 << 24
MAX_CHARS = 1 << 28  # summed length of the dotted paths of the leaves and SEEN entries


class Node:
    """One place in the walk: `key` (text) under `parent`, its depth and dotted-path length."""

    __slots__ = ("parent", "key", "obj", "depth", "length")

    def __init__(self, parent: Node | None, key: str, obj, depth: int, length: int):
        self.parent, self.key, self.obj, self.depth, self.length = parent, key, obj, depth, length

    def keys(self) -> list[str]:
        """The keys from the root to here."""
        out = []
        node = self
        while node.parent is not None:
            out.append(node.key)
            node = node.parent
        out.reverse()
        return out

    def path(self, sep: str = ".") -> str:
        return sep.join(self.keys())


class Event:
    __slots__ = ("kind", "node", "size", "first")

    def __init__(self, kind: str, node: Node, size: int = 0, first: Node | None = None):
        self.kind, self.node, self.size, self.first = kind, node, size, first


def _is_container(obj) -> bool:
    return isinstance(obj, (dict, list, tuple))


def items(obj) -> list | None:
    """dict / list / tuple entries as (key text, value): dict keys as str, indices as numbers; None for others."""
    if isinstance(obj, dict):
        return [(str(k), v) for k, v in obj.items()]
    if isinstance(obj, (list, tuple)):
        return [(str(i), v) for i, v in enumerate(obj)]
    return None


class _More:
    __slots__ = ("node", "hidden")

    def __init__(self, node: Node, hidden: int):
        self.node, self.hidden = node, hidden


def walk(root, children: Callable = items, *, is_leaf: Callable | None = None, max_items: int | None = None,
         max_entries: int = MAX_ENTRIES, max_chars: int = MAX_CHARS) -> Iterator[Event]:
    """Events of a depth-first walk of `root` (itself the entry with no keys).

    `children(obj)` gives a container's entries as (key text, value), or None for a leaf;
    `is_leaf(obj)` true stops there first. At most `max_items` entries of each container are
    walked (then a MORE event); after `max_entries` entries, or once the dotted paths of the leaves
    and SEEN entries add up to more than `max_chars`, one TRUNCATED event ends the walk.
    """
    seen: dict[int, Node] = {}  # id(container) -> where it was expanded (the graph holds it alive)
    stack: list = [Node(None, "", root, 0, 0)]
    entries = chars = 0
    while stack:
        node = stack.pop()
        if type(node) is _More:
            yield Event(MORE, node.node, node.hidden)
            continue
        entries += 1
        obj = node.obj
        first = seen.get(id(obj))  # (only containers are in `seen`, and the graph keeps them alive)
        kids = None if first is not None or (is_leaf is not None and is_leaf(obj)) else children(obj)
        if kids is None:
            chars += node.length  # the entries whose path a caller may spell out
        if entries > max_entries or chars > max_chars:
            yield Event(TRUNCATED, node)
            return
        if first is not None:
            yield Event(SEEN, node, first=first)
            continue
        if kids is None:
            yield Event(LEAF, node)
            continue
        seen[id(obj)] = node
        yield Event(CONTAINER, node, len(kids))
        shown = kids if max_items is None or len(kids) <= max_items else kids[:max_items]
        if len(shown) < len(kids):
            stack.append(_More(node, len(kids) - len(shown)))
        depth, base = node.depth + 1, node.length + (1 if node.parent is not None else 0)
        stack.extend(Node(node, key, value, depth, base + len(key)) for key, value in reversed(shown))


def leaves(root, is_leaf: Callable, *, max_entries: int = MAX_ENTRIES,
           max_chars: int = MAX_CHARS) -> tuple[dict, bool]:
    """({dotted path: leaf} in tree order, truncated) for the leaves `is_leaf` picks (see the naming rule).

    Two different leaves at one dotted path (keys with dots in them) are refused with a FormatError.
    """

    out: dict = {}
    for event in walk(root, is_leaf=is_leaf, max_entries=max_entries, max_chars=max_chars):
        if event.kind == TRUNCATED:
            return out, True
        if event.kind == LEAF and is_leaf(event.node.obj):
            path = event.node.path()
            if out.get(path, event.node.obj) is not event.node.obj:
                raise FormatError(f"two tensors are both named '{path}' (keys with dots in them?)")
            out[path] = event.node.obj
    return out, False


def flatten(root, is_leaf: Callable, *, max_entries: int = MAX_ENTRIES, max_chars: int = MAX_CHARS) -> dict:
    """{dotted path: leaf} of every leaf (see the naming rule); LimitError when the walk is truncated."""

    out, truncated = leaves(root, is_leaf, max_entries=max_entries, max_chars=max_chars)
    if truncated:
        raise LimitError(f"the object graph has more than {max_entries:,d} entries or {max_chars:,d} bytes "
                         "of paths; fastckpt.load reads it, but it cannot be listed by name")
    return out


def distinct_leaves(root, is_leaf: Callable, *, max_entries: int = MAX_ENTRIES) -> list:
    """Every leaf `is_leaf` picks, once each (by id), in tree order; LimitError when truncated."""

    out, ids = [], set()
    for event in walk(root, is_leaf=is_leaf, max_entries=max_entries, max_chars=1 << 62):
        if event.kind == TRUNCATED:
            raise LimitError(f"the object graph has more than {max_entries:,d} entries")
        obj = event.node.obj
        if event.kind == LEAF and id(obj) not in ids and is_leaf(obj):
            ids.add(id(obj))
            out.append(obj)
    return out


DROPPED = object()  # what without_leaves returns for a graph that was only leaves


def without_leaves(root, is_leaf: Callable):
    """A copy of the dict / list / tuple graph with the leaves left out, and the containers that held
    only leaves; DROPPED when nothing is left. Sharing and cycles are kept: each container is copied
    once (a tuple met again while its own entries are being copied is left out: it does not exist yet)."""
    done: dict[int, object] = {}  # id(original) -> its copy, or DROPPED
    building: dict[int, object] = {}  # id(original) -> the list/dict copy being filled (None for tuples)

    def resolved(value):
        if is_leaf(value):
            return DROPPED
        if not _is_container(value):
            return value
        key = id(value)
        if key in done:
            return done[key]
        made = building.get(key)
        return DROPPED if made is None else made

    stack: list = [(root, False)]
    while stack:
        obj, leaving = stack.pop()
        key = id(obj)
        if not leaving:
            if key in done or key in building or is_leaf(obj) or not _is_container(obj):
                continue
            building[key] = {} if isinstance(obj, dict) else [] if isinstance(obj, list) else None
            stack.append((obj, True))
            values = obj.values() if isinstance(obj, dict) else obj
            stack.extend((v, False) for v in reversed(list(values)) if _is_container(v) and not is_leaf(v))
            continue
        made = building[key]  # still in `building` while its entries are resolved: a cycle finds it
        if isinstance(obj, dict):
            made.update((k, r) for k, r in ((k, resolved(v)) for k, v in obj.items()) if r is not DROPPED)
            kept = made
        else:
            kept = [r for r in map(resolved, obj) if r is not DROPPED]
            if made is None:
                made = tuple(kept)
            else:
                made.extend(kept)
        done[key] = DROPPED if obj and not kept else made
        del building[key]
    return resolved(root)
