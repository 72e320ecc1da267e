"""Writing files so that readers see the old file or the new one, never a part: the one owner of temporaries.

A file is written to a temporary in its folder and renamed over its target. Temporaries are named
``.<target>.fastckpt-<host>-<pid>-<token>.tmp``: created exclusively and without following links
(``O_EXCL|O_NOFOLLOW``, so a name planted in a shared folder is never written through), with an
unpredictable token, and held under an exclusive ``flock`` while their writer lives. A writer killed
before its rename leaves its temporary behind; the next write into that folder removes it
(:func:`remove_stale`) once it is sure its writer is gone: the name says this host, that process id is
not running, and the lock is free. A live writer's temporary is never removed (a process in another PID
namespace that shares the host name still holds its lock).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import secrets
import socket
import stat

from fastckpt import _native

_MARK = ".fastckpt-"
_TEMP = re.compile(r"\.(?P<target>.+)\.fastckpt-(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]+)-(?P<token>[0-9a-f]{12})\.tmp", re.DOTALL)


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode("utf-8", "surrogateescape")).hexdigest()[:8]


class Temporary:
    """An exclusively created, locked temporary next to `target`; :meth:`publish` renames it over `target`.

    ``fd`` is open for writing. ``token`` is unique to this temporary (callers may name companion files
    with it: :func:`live_tokens` tells which tokens belong to live writers).
    """

    def __init__(self, target: str, mode: int | None = None):
        self.target = target
        directory, name = os.path.split(target)
        self.token = secrets.token_hex(6)
        self.path = os.path.join(directory, f".{name}{_MARK}{_host_tag()}-{os.getpid()}-{self.token}.tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
        try:
            self.fd = os.open(self.path, flags, 0o666)
        except FileNotFoundError:
            if directory and not os.path.isdir(directory):
                raise FileNotFoundError(errno.ENOENT, "the destination folder does not exist", directory) from None
            raise
        except PermissionError as e:  # a folder we may not write in: named as open(target, "wb") names it
            raise NotWritable(e.errno, e.strerror, target) from None
        try:
            _lock(self.fd)
            if mode is not None:
                os.fchmod(self.fd, stat.S_IMODE(mode))  # the replaced file's permissions, as an in-place write keeps
        except BaseException:
            self.discard()
            raise

    def publish(self, fsync: bool) -> None:
        """Renames the temporary over its target (fsync'd first with `fsync`, and the folder after)."""
        if fsync:
            os.fsync(self.fd)
        _native.replace_file(self.path, self.target)  # the fd stays open (and locked) until renamed
        self.path = None
        os.close(self.fd)
        self.fd = -1
        if fsync:
            sync_folder(os.path.dirname(self.target))

    def discard(self) -> None:
        """Removes the temporary (if not published) and closes it; safe to call twice."""
        if self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
            self.path = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.discard()


def _lock(fd: int) -> None:
    """Marks the temporary as its writer's while the writer lives (released by the kernel when it dies)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        # A file system without locks still gets its temporaries; the process id alone then decides.
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise


def sync_folder(directory: str) -> None:
    fd = os.open(directory or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class NotWritable(PermissionError, RuntimeError):
    """The target may not be written (its owner made it read-only): torch.save raises a PermissionError
    (Python's ``open``) or a RuntimeError (its C++ writer) there, depending on the path; this is both."""


def check_replaceable(path: str, shown=None) -> None:
    """Refuses where ``open(path, "wb")`` would (a file its owner made read-only, a read-only mount...):
    a rename would replace what an in-place write may not. The error names `shown` (default `path`)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return
    except OSError as e:
        cls = NotWritable if isinstance(e, PermissionError) else type(e)
        raise cls(e.errno, e.strerror, os.fspath(shown if shown is not None else path)) from None
    os.close(fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process (or a number we cannot judge): alive
    return True


def _scan(directory: str):
    """(name, parsed temporary name) of the fastckpt temporaries in `directory`."""
    try:
        with os.scandir(directory or ".") as entries:
            names = [e.name for e in entries if _MARK in e.name]
    except OSError:
        return []
    return [(name, m) for name in names if (m := _TEMP.fullmatch(name)) is not None]


def _stale(directory: str, name: str, m) -> bool:
    """Whether the temporary's writer is surely gone: this host, its pid not running, its lock free."""
    if m["host"] != _host_tag() or _alive(int(m["pid"])):
        return False
    try:
        fd = os.open(os.path.join(directory, name),
                     os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return False  # gone, a link, or not ours to open: left alone
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # locked: a live writer
        except OSError:
            pass  # no locks on this file system: the process id decides
        return True
    finally:
        os.close(fd)


def remove_stale(directory: str) -> list[tuple[str, str]]:
    """Removes the temporaries in `directory` left by writers that are gone; returns their (target name,
    token) pairs. Never touches a live writer's temporary."""
    removed = []
    for name, m in _scan(directory):
        if _stale(directory, name, m):
            try:
                os.unlink(os.path.join(directory, name))
            except FileNotFoundError:
                continue
            removed.append((m["target"], m["token"]))
    return removed


def live_tokens(directory: str) -> set[str]:
    """Tokens of the temporaries in `directory` whose writers may still be running."""
    return {m["token"] for name, m in _scan(directory) if not _stale(directory, name, m)}


def write_file(f, atomic: bool, fsync: bool, write) -> None:
    """Calls write(fd) for a path (atomically: a temporary renamed over `f`), write(file) otherwise.

    A path that is a link is written through (the file it points to is replaced, not the link); a
    device or a pipe is written in place. Refuses, as ``open(f, "wb")`` does, a file that may not be
    written. With `fsync`, the bytes and the rename are on disk when this returns.
    """
    if not isinstance(f, str):
        write(f)
        return
    path = os.path.realpath(f) if os.path.islink(f) else f
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        with open(path, "wb") as file:  # a device or a pipe: written in order, in place
            write(file)
        return
    if mode is not None:
        check_replaceable(path, f)
    if not atomic:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        try:
            write(fd)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        return
    remove_stale(os.path.dirname(path))
    with Temporary(path, mode) as tmp:
        write(tmp.fd)
        tmp.publish(fsync)
