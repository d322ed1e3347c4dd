"""Result files: successes to one JSONL file, failures to another, one line per request.

``-`` is standard output. Paths are checked before anything is enqueued
(``check_writable``), so a typo in a directory name costs nothing.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import IO

import orjson

from promptq.shared.errors import InputError, LineError

STDIO = "-"


def default_errors_path(output: Path) -> Path:
    """``out.jsonl`` -> ``out.errors.jsonl``: failures are never dropped silently. For ``-``
    (standard output) failures go there too."""
    if str(output) == STDIO:
        return output
    stem = output.name.removesuffix(".jsonl")
    return output.with_name(f"{stem}.errors.jsonl")


def check_writable(path: Path, *, option: str) -> None:
    """Raise ``InputError`` (exit 2) unless ``path`` can be written: its directory exists
    and takes files, and it is not a directory itself."""
    if str(path) == STDIO:
        return
    problem = None
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        problem = "is a directory; give a file name"
    elif not parent.exists():
        problem = f"directory {parent} does not exist; create it first (mkdir -p {parent})"
    elif not parent.is_dir():
        problem = f"{parent} is not a directory"
    elif not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        problem = "is not writable (permissions)"
    if problem is not None:
        raise InputError(f"{option} {path}", [LineError(0, None, problem)])


class ResultFiles:
    """Writes stored result lines (JSON bytes) to the success or the errors file.

    Both files are always created (the errors file empty if nothing failed). With
    ``append``, the success file keeps its lines (a resumed run); the errors file always
    starts empty (its requests are sent again).
    """

    def __init__(self, ok_path: Path, errors_path: Path, *, append: bool = False) -> None:
        self.ok_path = ok_path
        self.errors_path = errors_path
        self.append = append
        self.ok = 0
        self.failed = 0
        self._ok: IO[bytes] | None = None
        self._err: IO[bytes] | None = None
        self._own: list[IO[bytes]] = []

    @property
    def written(self) -> int:
        return self.ok + self.failed

    def _open(self, path: Path, mode: str) -> IO[bytes]:
        if str(path) == STDIO:
            return sys.stdout.buffer
        f = path.open(mode)
        self._own.append(f)
        return f

    def __enter__(self) -> ResultFiles:
        self._ok = self._open(self.ok_path, "ab" if self.append else "wb")
        self._err = (
            self._ok if str(self.errors_path) == str(self.ok_path) else self._open(
                self.errors_path, "wb"
            )
        )  # fmt: skip
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.flush()
        for f in self._own:
            f.close()
        self._own.clear()

    def write(self, raw: bytes) -> bool:
        """Write one stored result line; return True if it was a success."""
        assert self._ok is not None
        assert self._err is not None
        ok = orjson.loads(raw).get("error") is None
        (self._ok if ok else self._err).write(raw + b"\n")
        if ok:
            self.ok += 1
        else:
            self.failed += 1
        return ok

    def flush(self) -> None:
        for f in (self._ok, self._err):
            if f is not None:
                f.flush()


class InOrder:
    """Hands result lines on in input order (``--order input``): a line waits until every
    request before it has its line. Holds at most the lines that finished early."""

    def __init__(self, ids_in_order: Iterable[str]) -> None:
        self._position = {cid: i for i, cid in enumerate(ids_in_order)}
        self._next = 0
        self._waiting: dict[int, bytes] = {}

    def add(self, custom_id: str, raw: bytes) -> list[bytes]:
        """Take one line; return the lines now due, in order."""
        position = self._position.get(custom_id)
        if position is None:  # not part of this run's input: no place to wait for
            return [raw]
        self._waiting[position] = raw
        due = []
        while self._next in self._waiting:
            due.append(self._waiting.pop(self._next))
            self._next += 1
        return due

    def rest(self) -> list[bytes]:
        """Lines still waiting (the batch ended without some results), in order."""
        out = [self._waiting[k] for k in sorted(self._waiting)]
        self._waiting.clear()
        return out
