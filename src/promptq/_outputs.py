"""Result files: successes to one JSONL file, failures to another, one line per request."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import IO

import orjson


def default_errors_path(output: Path) -> Path:
    """``out.jsonl`` -> ``out.errors.jsonl``: failures are never dropped silently."""
    stem = output.name.removesuffix(".jsonl")
    return output.with_name(f"{stem}.errors.jsonl")


class ResultFiles:
    """Writes stored result lines (JSON bytes) to the success or the errors file.

    Both files are always created (the errors file empty if nothing failed).
    """

    def __init__(self, ok_path: Path, errors_path: Path) -> None:
        self.ok_path = ok_path
        self.errors_path = errors_path
        self.ok = 0
        self.failed = 0
        self._ok: IO[bytes] | None = None
        self._err: IO[bytes] | None = None

    @property
    def written(self) -> int:
        return self.ok + self.failed

    def __enter__(self) -> ResultFiles:
        self._ok = self.ok_path.open("wb")
        self._err = self.errors_path.open("wb")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for f in (self._ok, self._err):
            if f is not None:
                f.close()

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
