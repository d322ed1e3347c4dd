"""``/v1/files``: upload (multipart, ``purpose=batch``), list, metadata, content, delete.

Uploads live in Redis (see ``api.store``). A batch's output and error files are
virtual (``file-out-<batch id>``, ``file-err-<batch id>``): generated from its results
when read, successes in one and failures in the other, one line per custom_id.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import orjson
from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from promptq.api.errors import (
    ApiError,
    bad_request,
    json_response,
    list_limit,
    not_found,
    unknown_cursor,
)
from promptq.api.objects import ERROR_PREFIX, OUTPUT_PREFIX, file_object
from promptq.api.state import PRODUCER, SETTINGS, STORE
from promptq.api.store import StoredFile, UnknownCursor
from promptq.api.streaming import stream_lines
from promptq.producer import Batch
from promptq.shared import keys

#: small form fields (purpose, expires_after[...]) are capped at this many bytes
_FIELD_LIMIT = 4096
#: multipart framing and the small fields on top of the file itself
_FORM_OVERHEAD = 64 * 1024
_CHUNK = 256 * 1024
#: GET /v1/files: OpenAI's default and largest page
MAX_FILES_PAGE = 10_000

_HOW = (
    "send multipart/form-data with the fields 'file' (the JSONL file) and 'purpose' "
    "('batch'), as client.files.create(file=open('in.jsonl', 'rb'), purpose='batch') does"
)


def count_lines(data: bytes | bytearray) -> int:
    """Lines as ``parse_jsonl`` counts them (a final newline does not start a line)."""
    lines = data.count(b"\n")
    return lines + 1 if data and not data.endswith(b"\n") else lines


def _too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        f"The file is larger than the {limit:,}-byte limit (PROMPTQ_MAX_FILE_BYTES); "
        "split it into several batches.",
        param="file",
        code="file_too_large",
    )


async def _read_part(part: BodyPartReader, limit: int) -> bytearray | None:
    """The part's bytes, or None when it is longer than ``limit``."""
    data = bytearray()
    while chunk := await part.read_chunk(_CHUNK):
        data += chunk
        if len(data) > limit:
            return None
    return data


async def _read_form(request: web.Request, limit: int) -> tuple[bytearray, str, str]:
    """(file bytes, filename, purpose) from the multipart body, size-checked as it streams."""
    reader = await request.multipart()
    content: bytearray | None = None
    filename = ""
    purpose: str | None = None
    while (part := await reader.next()) is not None:
        if not isinstance(part, BodyPartReader):
            raise bad_request(f"Nested multipart bodies are not supported; {_HOW}.")
        if part.name == "file":
            if content is not None:
                raise bad_request("Send one 'file' field per upload.", param="file")
            content = await _read_part(part, limit)
            if content is None:
                raise _too_large(limit)
            filename = (part.filename or "upload.jsonl")[:255]
        elif part.name == "purpose":
            value = await _read_part(part, _FIELD_LIMIT)
            purpose = (value or b"").decode("utf-8", "replace").strip()
        elif await _read_part(part, _FIELD_LIMIT) is None:  # other fields: read and ignored
            raise bad_request(f"Form field '{part.name}' is too long.", param=part.name)
    if purpose is None:
        raise bad_request(f"Missing the 'purpose' field; {_HOW}.", param="purpose")
    if content is None:
        raise bad_request(f"Missing the 'file' field; {_HOW}.", param="file")
    return content, filename, purpose


async def upload_file(request: web.Request) -> web.Response:
    """POST /v1/files: store a JSONL file for ``POST /v1/batches``."""
    settings = request.app[SETTINGS]
    limit = settings.api_max_file_bytes
    if request.content_type != "multipart/form-data":
        raise bad_request(
            f"Expected multipart/form-data, got '{request.content_type}'; {_HOW}.",
            code="invalid_content_type",
        )
    if request.content_length is not None and request.content_length > limit + _FORM_OVERHEAD:
        raise _too_large(limit)  # refuse before reading a byte of it
    try:
        content, filename, purpose = await _read_form(request, limit)
    # aiohttp reports malformed framing with ValueError, RuntimeError and, for a few
    # checks, assert; none of them is the server's fault.
    except (ValueError, AssertionError, RuntimeError, HttpProcessingError) as exc:
        raise bad_request(
            f"Malformed multipart/form-data body ({exc or type(exc).__name__}); {_HOW}.",
            code="invalid_multipart",
        ) from exc
    if purpose != "batch":
        raise bad_request(
            f"Unsupported purpose '{purpose}': promptq stores files for batches only; "
            "set purpose='batch'.",
            param="purpose",
            code="invalid_purpose",
        )
    if not content:
        raise bad_request(
            "The file is empty; upload a JSONL file with one request a line.",
            param="file",
            code="empty_file",
        )
    lines = count_lines(content)
    if lines > settings.api_max_lines:
        raise bad_request(
            f"The file has {lines:,} lines, over the {settings.api_max_lines:,}-line limit "
            "(PROMPTQ_API_MAX_LINES); split it into several batches.",
            param="file",
            code="too_many_lines",
        )
    stored = await request.app[STORE].save_file(
        memoryview(content),
        filename=filename,
        purpose=purpose,
        lines=lines,
        ttl_s=settings.api_file_ttl_s,
    )
    return json_response(_uploaded(stored))


def _uploaded(stored: StoredFile) -> dict[str, object]:
    return file_object(
        stored.id,
        size=stored.size,
        created_at=stored.created_at,
        filename=stored.filename,
        purpose=stored.purpose,
        expires_at=stored.expires_at,
    )


async def list_files(request: web.Request) -> web.Response:
    """GET /v1/files?purpose=&limit=&order=&after=: uploaded files (not the virtual
    output and error files), newest first unless ``order=asc``."""
    limit = list_limit(request, default=MAX_FILES_PAGE, maximum=MAX_FILES_PAGE)
    order = request.query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise bad_request(
            f"'order' must be 'asc' or 'desc', got '{order}'.", param="order", code="invalid_order"
        )
    purpose = request.query.get("purpose")
    after = request.query.get("after") or None
    store = request.app[STORE]
    if purpose not in (None, "", "batch"):
        page: list[StoredFile] = []  # promptq stores files for batches only
        has_more = False
    else:
        try:
            page, has_more = await store.page(
                keys.FILES, store.files, after=after, limit=limit, newest_first=order == "desc"
            )
        except UnknownCursor:
            raise unknown_cursor(str(after), "file") from None
    return json_response(
        {
            "object": "list",
            "data": [_uploaded(f) for f in page],
            "first_id": page[0].id if page else None,
            "last_id": page[-1].id if page else None,
            "has_more": has_more,
        }
    )


async def delete_file(request: web.Request) -> web.Response:
    """DELETE /v1/files/{file_id}: remove an upload (a batch created from it keeps its
    requests; one still validating fails, naming the missing file)."""
    file_id = request.match_info["file_id"]
    if _virtual(file_id) is not None:
        raise bad_request(
            f"'{file_id}' is generated from its batch's results and expires with them "
            "(PROMPTQ_RESULT_TTL_S); there is nothing to delete on its own.",
            code="invalid_file_id",
        )
    if not await request.app[STORE].delete_file(file_id):
        raise _no_file(file_id)
    return json_response({"id": file_id, "object": "file", "deleted": True})


def _virtual(file_id: str) -> tuple[str, bool] | None:
    """(batch id, successes?) for a batch's output or error file id, else None."""
    if file_id.startswith(OUTPUT_PREFIX):
        return file_id.removeprefix(OUTPUT_PREFIX), True
    if file_id.startswith(ERROR_PREFIX):
        return file_id.removeprefix(ERROR_PREFIX), False
    return None


def _no_file(file_id: str) -> ApiError:
    return not_found(
        f"No file '{file_id}': wrong id, deleted, or expired (uploads are kept "
        "PROMPTQ_API_FILE_TTL_S seconds, results PROMPTQ_RESULT_TTL_S after their batch ends).",
        code="file_not_found",
    )


async def result_lines(batch: Batch, *, ok: bool) -> AsyncIterator[bytes]:
    """The batch's stored result lines that succeeded (``ok``) or failed, once each."""
    seen: set[str] = set()
    async for raw in batch.raw_results():
        line = orjson.loads(raw)
        if (line.get("error") is None) is not ok or line["custom_id"] in seen:
            continue  # HSCAN may repeat an entry while the hash grows
        seen.add(line["custom_id"])
        yield raw


async def retrieve_file(request: web.Request) -> web.Response:
    """GET /v1/files/{file_id}: the File object."""
    file_id = request.match_info["file_id"]
    virtual = _virtual(file_id)
    if virtual is not None:
        batch_id, ok = virtual
        stored = await request.app[STORE].batch(batch_id)
        if stored is None:
            raise _no_file(file_id)
        batch = request.app[PRODUCER].batch(batch_id)
        size = 0
        async for raw in result_lines(batch, ok=ok):
            size += len(raw) + 1
        ended = stored.raw.get("completed_at") or stored.raw.get("created_at") or "0"
        return json_response(
            file_object(
                file_id,
                size=size,
                created_at=int(float(ended)),
                filename=f"{batch_id}_{'output' if ok else 'error'}.jsonl",
                purpose="batch_output",
            )
        )
    found = await request.app[STORE].file(file_id)
    if found is None:
        raise _no_file(file_id)
    return json_response(_uploaded(found))


async def file_content(request: web.Request) -> web.StreamResponse:
    """GET /v1/files/{file_id}/content: the file's bytes (JSONL)."""
    file_id = request.match_info["file_id"]
    virtual = _virtual(file_id)
    if virtual is None:
        data = await request.app[STORE].file_content(file_id)
        if data is None:
            raise _no_file(file_id)
        return web.Response(body=data, content_type="application/octet-stream")
    batch_id, ok = virtual
    if await request.app[STORE].batch(batch_id) is None:
        raise _no_file(file_id)
    lines = result_lines(request.app[PRODUCER].batch(batch_id), ok=ok)
    return await stream_lines(request, lines, content_type="application/octet-stream")
