"""The mock's Batch API: OpenAI's Files and Batches endpoints, in memory.

``POST /v1/files`` (multipart, purpose ``batch``), ``GET /v1/files/{id}``,
``GET /v1/files/{id}/content``, ``POST /v1/batches``, ``GET /v1/batches`` (newest first,
``after``/``limit``), ``GET /v1/batches/{id}``, ``POST /v1/batches/{id}/cancel``.

A batch is ``validating``, then ``in_progress`` for ``MockConfig.batch_turnaround_s``,
then each line is answered as ``POST /v1/chat/completions`` would (``"echo: ..."``, or
the error a ``status=`` directive asks for) and the batch is ``completed`` with an
output file (2xx answers) and an error file (the rest). ``[[mock batch=...]]`` in a
line scripts the batch: ``fail`` (validation fails, ``errors`` name the line),
``expire`` (the line is not run: ``expired``, the line in the error file as
``batch_expired``), ``hold`` (the line is not run until the batch is cancelled: it stays
``in_progress``; cancelled, the line is ``batch_cancelled``).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Final

import orjson
from aiohttp import web

from promptq.mock._directives import DIRECTIVE_MARKER, DirectiveError, parse_directives
from promptq.mock._models import MockConfig, MockStats
from promptq.mock._responses import error_response, status_error, success_bytes

_JSON: Final = "application/json"
#: lines answered between two yields to the event loop
_YIELD_EVERY: Final = 1000


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(payload), content_type=_JSON)


def _not_found(what: str) -> web.Response:
    return error_response(404, f"No such {what}.", type_="invalid_request_error", code=None)


def _bad(message: str, param: str | None = None) -> web.Response:
    return error_response(400, message, type_="invalid_request_error", code=None, param=param)


def answer_line(body: Any, default_model: str) -> tuple[int, Any, str | None]:
    """(status, body, fate) for one Batch API line's body: what the chat endpoint answers
    (without latency or random faults), and its ``batch=`` directive."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        return 400, _error_body(400, "'messages' is required and must be a non-empty array."), None
    messages = [m for m in body["messages"] if isinstance(m, dict)]
    model: str = body["model"] if isinstance(body.get("model"), str) else default_model
    fate = None
    if DIRECTIVE_MARKER in orjson.dumps(messages).decode():
        try:
            directives = parse_directives(messages)
        except DirectiveError as exc:
            return 400, _error_body(400, str(exc)), None
        if directives is not None:
            fate = directives.batch
            if directives.status is not None or directives.quota:
                status = 429 if directives.quota else directives.status or 500
                response = status_error(status, model, quota=directives.quota)
                assert isinstance(response.body, bytes)
                return status, orjson.loads(response.body), fate
    return 200, orjson.loads(success_bytes(body, messages, model)), fate


def _error_body(status: int, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": None,
                      "code": None}}  # fmt: skip


class MockBatchApi:
    """The in-memory Files and Batches of one mock app."""

    def __init__(self, config: MockConfig, stats: MockStats) -> None:
        self.config = config
        self.stats = stats
        self.files: dict[str, dict[str, Any]] = {}
        self.contents: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self._cancel: dict[str, asyncio.Event] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/files", self.upload)
        app.router.add_get("/v1/files/{file_id}", self.file)
        app.router.add_get("/v1/files/{file_id}/content", self.content)
        app.router.add_post("/v1/batches", self.create)
        app.router.add_get("/v1/batches", self.list_batches)
        app.router.add_get("/v1/batches/{batch_id}", self.retrieve)
        app.router.add_post("/v1/batches/{batch_id}/cancel", self.cancel)
        app.on_shutdown.append(self._shutdown)

    def _count(self, kind: str) -> None:
        self.stats.batch_calls[kind] = self.stats.batch_calls.get(kind, 0) + 1

    async def _shutdown(self, _app: web.Application) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # -- files ---------------------------------------------------------------------------

    def _store(self, data: bytes, *, filename: str, purpose: str) -> dict[str, Any]:
        file_id = "file-" + os.urandom(12).hex()
        meta = {
            "id": file_id,
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
        }
        self.files[file_id] = meta
        self.contents[file_id] = data
        return meta

    async def upload(self, request: web.Request) -> web.Response:
        self._count("upload")
        if not request.content_type.startswith("multipart/"):
            return _bad("Upload the file as multipart/form-data (purpose, file).")
        form = await request.post()
        purpose = form.get("purpose")
        upload = form.get("file")
        if purpose != "batch":
            return _bad("'purpose' must be 'batch'.", "purpose")
        if not isinstance(upload, web.FileField):
            return _bad("'file' is required.", "file")
        data = upload.file.read()
        return _json(self._store(data, filename=upload.filename, purpose="batch"))

    async def file(self, request: web.Request) -> web.Response:
        meta = self.files.get(request.match_info["file_id"])
        return _json(meta) if meta is not None else _not_found("file")

    async def content(self, request: web.Request) -> web.Response:
        self._count("content")
        data = self.contents.get(request.match_info["file_id"])
        if data is None:
            return _not_found("file")
        return web.Response(body=data, content_type="application/octet-stream")

    # -- batches -------------------------------------------------------------------------

    async def create(self, request: web.Request) -> web.Response:
        self._count("create")
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _bad("We could not parse the JSON body of your request.")
        if not isinstance(body, dict):
            return _bad("The request body must be a JSON object.")
        file_id = body.get("input_file_id")
        if file_id not in self.contents:
            return _bad(f"No file '{file_id}'.", "input_file_id")
        if body.get("completion_window") != "24h":
            return _bad("'completion_window' must be '24h'.", "completion_window")
        endpoint = body.get("endpoint")
        if not isinstance(endpoint, str):
            return _bad("'endpoint' is required.", "endpoint")
        now = int(time.time())
        batch_id = "batch_" + os.urandom(12).hex()
        batch: dict[str, Any] = {
            "id": batch_id,
            "object": "batch",
            "endpoint": endpoint,
            "errors": None,
            "input_file_id": file_id,
            "completion_window": "24h",
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "in_progress_at": None,
            "expires_at": now + 86400,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": body.get("metadata") or None,
        }
        self.batches[batch_id] = batch
        self._cancel[batch_id] = asyncio.Event()
        task = asyncio.create_task(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return _json(batch)

    async def retrieve(self, request: web.Request) -> web.Response:
        self._count("retrieve")
        batch = self.batches.get(request.match_info["batch_id"])
        return _json(batch) if batch is not None else _not_found("batch")

    async def list_batches(self, request: web.Request) -> web.Response:
        self._count("list")
        try:
            limit = min(max(int(request.query.get("limit", "20")), 1), 100)
        except ValueError:
            return _bad("'limit' must be an integer.", "limit")
        newest = list(reversed(self.batches.values()))
        after = request.query.get("after")
        if after:
            ids = [b["id"] for b in newest]
            if after not in ids:
                return _bad(f"No batch '{after}' to list after.", "after")
            newest = newest[ids.index(after) + 1 :]
        page = newest[:limit]
        return _json({
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(newest) > limit,
        })  # fmt: skip

    async def cancel(self, request: web.Request) -> web.Response:
        self._count("cancel")
        batch = self.batches.get(request.match_info["batch_id"])
        if batch is None:
            return _not_found("batch")
        if batch["status"] not in ("validating", "in_progress", "finalizing"):
            return error_response(
                409,
                f"Cannot cancel a batch with status '{batch['status']}'.",
                type_="invalid_request_error",
                code=None,
            )
        batch["status"] = "cancelling"
        batch["cancelling_at"] = int(time.time())
        self._cancel[batch["id"]].set()
        return _json(batch)

    # -- running one batch ---------------------------------------------------------------

    async def _run(self, batch: dict[str, Any]) -> None:
        cancel = self._cancel[batch["id"]]
        lines, errors = self._parse(self.contents[batch["input_file_id"]])
        batch["request_counts"]["total"] = len(lines)
        if errors:
            batch.update(status="failed", failed_at=int(time.time()),
                         errors={"object": "list", "data": errors})  # fmt: skip
            return
        batch.update(status="in_progress", in_progress_at=int(time.time()))
        if self.config.batch_turnaround_s > 0:
            try:
                async with asyncio.timeout(self.config.batch_turnaround_s):
                    await cancel.wait()
            except TimeoutError:
                pass
        output: list[bytes] = []
        failures: list[bytes] = []
        held: list[str] = []
        expired: list[str] = []
        for index, (custom_id, body) in enumerate(lines):
            if index % _YIELD_EVERY == _YIELD_EVERY - 1:
                await asyncio.sleep(0)
            if cancel.is_set():
                held.append(custom_id)
                continue
            status, answer, fate = answer_line(body, self.config.model)
            if fate == "hold":
                held.append(custom_id)
                continue
            if fate == "expire":
                expired.append(custom_id)
                continue
            line = {
                "id": "batch_req_" + os.urandom(12).hex(),
                "custom_id": custom_id,
                "response": {"status_code": status, "request_id": "req_" + os.urandom(12).hex(),
                             "body": answer},
                "error": None,
            }  # fmt: skip
            (output if 200 <= status < 300 else failures).append(orjson.dumps(line))
        if held and not cancel.is_set():
            batch["finalizing_at"] = None
            await cancel.wait()  # held lines run only... never: until cancelled
        ended = int(time.time())
        if cancel.is_set():
            failures += [_not_run(c, "batch_cancelled", "The batch was cancelled.") for c in held]
            final = "cancelled"
        elif expired:
            failures += [
                _not_run(c, "batch_expired", "This request could not be executed before the "
                         "completion window expired.")
                for c in expired
            ]  # fmt: skip
            final = "expired"
        else:
            final = "completed"
        batch["finalizing_at"] = ended
        if output:
            name = f"{batch['id']}_output.jsonl"
            meta = self._store(b"\n".join(output) + b"\n", filename=name, purpose="batch_output")
            batch["output_file_id"] = meta["id"]
        if failures:
            name = f"{batch['id']}_error.jsonl"
            meta = self._store(b"\n".join(failures) + b"\n", filename=name, purpose="batch_output")
            batch["error_file_id"] = meta["id"]
        batch["request_counts"].update(completed=len(output), failed=len(failures))
        batch.update(status=final)
        batch[f"{final}_at"] = ended

    def _parse(self, data: bytes) -> tuple[list[tuple[str, Any]], list[dict[str, Any]]]:
        lines: list[tuple[str, Any]] = []
        errors: list[dict[str, Any]] = []
        for number, raw in enumerate(data.splitlines(), 1):
            if not raw.strip():
                continue
            try:
                item = orjson.loads(raw)
            except orjson.JSONDecodeError:
                errors.append({"code": "invalid_json", "message": "Invalid JSON.", "line": number})
                continue
            if not isinstance(item, dict) or not isinstance(item.get("custom_id"), str):
                errors.append({"code": "missing_custom_id", "line": number,
                               "message": "Each line needs a string custom_id."})  # fmt: skip
                continue
            body = item.get("body")
            if DIRECTIVE_MARKER.encode() in raw:
                _, _, fate = answer_line(body, self.config.model)
                if fate == "fail":
                    errors.append({"code": "mock_failure", "line": number,
                                   "message": "[[mock batch=fail]] in this line"})  # fmt: skip
            lines.append((item["custom_id"], body))
        return lines, errors


def _not_run(custom_id: str, code: str, message: str) -> bytes:
    return orjson.dumps({
        "id": "batch_req_" + os.urandom(12).hex(),
        "custom_id": custom_id,
        "response": None,
        "error": {"code": code, "message": message},
    })  # fmt: skip
