"""Resumable local runs: the output files of an embedded ``promptq run`` are its checkpoint.

An embedded run (no Redis) dies with its process, so what survives it is what it wrote:
every success line in OUT is a request that needs no sending again. Next to OUT the run
keeps ``OUT.promptq.json``: the fingerprint of its input (custom_ids and bodies). Run
again with the same input and output, it sends only the requests without a line in OUT
(failures are sent again: the errors file starts empty). Other input with the same
output is refused (exit 2) unless ``--restart`` says to start over.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from promptq.producer.parsing import SpooledBatch
from promptq.producer.producer import fingerprint
from promptq.shared.errors import InputError, LineError

SUFFIX = ".promptq.json"


def sidecar(output: Path) -> Path:
    return output.with_name(output.name + SUFFIX)


@dataclass(frozen=True, slots=True)
class Resume:
    """What a run takes up: the requests still to send, and how many were done before."""

    todo: SpooledBatch
    done: int
    resumed: bool


def done_ids(output: Path) -> set[str]:
    """custom_ids with a line in ``output``. A last line cut short by a crash is removed
    from the file (it is sent again)."""
    if not output.exists():
        return set()
    data = output.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):  # a partial last line: drop it
        with output.open("r+b") as f:
            f.truncate(end)
    ids: set[str] = set()
    for number, raw in enumerate(data[:end].splitlines(), start=1):
        try:
            ids.add(str(orjson.loads(raw)["custom_id"]))
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise InputError(
                str(output),
                [LineError(number, None, f"is not a result line ({exc}); use --restart")],
            ) from exc
    return ids


def take_up(parsed: SpooledBatch, *, output: Path, source: str, restart: bool) -> Resume:
    """The part of ``parsed`` still to run with ``output`` as the checkpoint, and the
    checkpoint's sidecar (re)written for it. Raises ``InputError`` when ``output`` holds
    the results of other input."""
    meta = sidecar(output)
    digest = fingerprint(parsed)
    if not restart and meta.exists():
        try:
            recorded = orjson.loads(meta.read_bytes())
        except orjson.JSONDecodeError:
            recorded = {}
        if recorded.get("fingerprint") != digest:
            raise InputError(
                str(output),
                [
                    LineError(
                        0,
                        None,
                        f"holds results of other input ({recorded.get('input', '?')}, "
                        f"{recorded.get('total', '?')} requests) than {source}: run with "
                        "--restart to start over, or write to another -o",
                    )
                ],
            )
        done = done_ids(output)
        todo = parsed.filtered(lambda r: r.custom_id not in done)
        return Resume(todo=todo, done=parsed.total - todo.total, resumed=True)
    if restart:
        output.unlink(missing_ok=True)
    tmp = meta.with_name(meta.name + ".tmp")
    tmp.write_bytes(
        orjson.dumps(
            {
                "input": source,
                "fingerprint": digest,
                "total": parsed.total,
                "started_at": round(time.time(), 3),
            }
        )
    )
    os.replace(tmp, meta)
    return Resume(todo=parsed, done=0, resumed=False)
