"""OpenAI's Files and Batch APIs: ``/v1/files`` (upload, list, show, content, delete) and
``/v1/batches`` (create, show, list, cancel), each file and batch its tenant's alone
(another key's is a 404, as if it did not exist).
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway.errors import GatewayError, InvalidRequest, NotFound, Unavailable
from gateway.http.bodies import UPLOAD_OVERHEAD, body_of, raw_body
from gateway.http.middlewares import json_response
from gateway.keys import CONFIG, KEY, TENANT
from gateway.tasks import Tasks
from gateway.tasks.batches import StoreDown
from gateway.tasks.records import (
    ENDPOINTS,
    PURPOSES,
    WINDOWS,
    batch_record,
    file_record,
    new_id,
    shown,
)

log = logging.getLogger(__name__)
TASKS = web.AppKey("tasks", Tasks)
LIST_LIMIT = 100  # batches a page
FILES_LIMIT = 10_000  # files a page (OpenAI's most, and its default)


async def upload(request: web.Request) -> web.Response:
    fields = await _form(request, raw_body(request))
    purpose = fields.get("purpose")
    if not isinstance(purpose, str) or purpose not in PURPOSES[:2]:
        raise InvalidRequest(f"purpose must be one of {', '.join(PURPOSES[:2])}.",
                             param="purpose")
    upload = fields.get("file")
    if not isinstance(upload, tuple):
        raise InvalidRequest("A file is needed (multipart field 'file').", param="file")
    filename, content = upload
    record = file_record(new_id("file-"), request[TENANT], filename, purpose, len(content))
    await request.app[TASKS].store.save_file(record, content)
    return json_response(shown(record))


async def list_files(request: web.Request) -> web.Response:
    """A tenant's files, newest first unless ``order=asc``, a page at a time (``limit``,
    ``after``), as OpenAI lists them.
    """
    purpose = request.query.get("purpose")
    order = request.query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequest("order must be asc or desc.", param="order")
    # By id, which is the order each was made in (the time, then chance): the order a page's
    # ``after`` reads, also when its file was deleted meanwhile (by seconds, a batch's files,
    # named after the batch, came before a file made while it ran: the clean-up loop of
    # ``files.list`` skipped that one).
    files = sorted((f for f in await request.app[TASKS].store.files(request[TENANT])
                    if purpose is None or f["purpose"] == purpose),
                   key=lambda f: f["id"], reverse=order == "desc")
    return json_response(_page(request, files, FILES_LIMIT, descending=order == "desc"))


async def get_file(request: web.Request) -> web.Response:
    return json_response(shown(await _file(request)))


async def file_content(request: web.Request) -> web.Response:
    record = await _file(request)
    content = await request.app[TASKS].store.content(record["id"])
    if content is None:
        raise NotFound(f"The content of {record['id']} is gone.", code="file_not_found")
    return web.Response(body=content, content_type="application/octet-stream")


async def delete_file(request: web.Request) -> web.Response:
    record = await _file(request)
    await request.app[TASKS].store.delete_file(record["id"])
    return json_response({"id": record["id"], "object": "file", "deleted": True})


async def create_batch(request: web.Request) -> web.Response:
    body = await body_of(request)
    endpoint = body.get("endpoint")
    if endpoint not in ENDPOINTS:
        raise InvalidRequest(f"endpoint must be one of {', '.join(ENDPOINTS)}.",
                             param="endpoint")
    window = body.get("completion_window", "24h")
    if not isinstance(window, str) or window not in WINDOWS:
        raise InvalidRequest("completion_window must be 24h.", param="completion_window")
    metadata = body.get("metadata")
    if metadata is not None and (not isinstance(metadata, dict) or len(metadata) > 16 or
                                 not all(isinstance(v, str) and len(k) <= 64 and len(v) <= 512
                                         for k, v in metadata.items())):
        raise InvalidRequest("metadata must be at most 16 string values, each key at most 64 "
                             "characters and each value at most 512.", param="metadata")
    file_id = body.get("input_file_id")
    if not isinstance(file_id, str) or not file_id:
        raise InvalidRequest("input_file_id is required: the id of a file uploaded with "
                             "purpose batch.", param="input_file_id")
    source = await _file(request, file_id, param="input_file_id")
    if source["purpose"] != "batch":
        raise InvalidRequest(f"The file {source['id']} was uploaded for {source['purpose']}; "
                             "a batch's input needs purpose batch.", param="input_file_id")
    tasks = request.app[TASKS]
    record = batch_record(new_id("batch_"), request[TENANT], endpoint, source["id"], window,
                          metadata)
    key = request.get(KEY)
    record["models"] = list(key.models) if key is not None else []  # (the key's, for later)
    record["cache_scope"] = key.cache if key is not None else ""
    await tasks.store.put_batch(record)
    # A client that hangs up now must not leave the batch half made: begin goes on.
    beginning = asyncio.ensure_future(tasks.batches.begin(record))
    _BEGINNING.add(beginning)
    beginning.add_done_callback(functools.partial(_begun, record["id"]))
    return json_response(shown(await asyncio.shield(beginning)))


_BEGINNING: set[asyncio.Future[dict[str, Any]]] = set()  # (held until done)


def _begun(batch_id: str, beginning: asyncio.Future[dict[str, Any]]) -> None:
    """A batch's begin is over: its failure told, should its client have left."""
    _BEGINNING.discard(beginning)
    if not beginning.cancelled() and beginning.exception() is not None:
        log.error("batch %s could not begin: %s", batch_id, beginning.exception())


async def get_batch(request: web.Request) -> web.Response:
    return json_response(shown(await _batch(request)))


async def list_batches(request: web.Request) -> web.Response:
    everything = sorted(await request.app[TASKS].store.batches(request[TENANT]),
                        key=lambda b: (b["created_at"], b["id"]), reverse=True)
    return json_response(_page(request, everything, LIST_LIMIT, default=20))


def _page(request: web.Request, records: list[dict[str, Any]], most: int,
          default: int | None = None, descending: bool = True) -> dict[str, Any]:
    """A page of ``records`` (in the order of their ids, ``descending`` or not): ``limit``
    of them (up to ``most``) from the one after ``after``, in OpenAI's list shape.
    """
    try:
        limit = max(1, min(most, int(request.query.get("limit", default or most))))
    except ValueError:
        raise InvalidRequest("limit must be a number.", param="limit") from None
    after = request.query.get("after")
    if after is not None:
        ids = [r["id"] for r in records]
        if after in ids:
            records = records[ids.index(after) + 1:]
        else:  # deleted meanwhile: those it came before
            records = [r for r in records if (r["id"] < after if descending
                                              else r["id"] > after)]
    page = [shown(r) for r in records[:limit]]
    return {"object": "list", "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(records) > limit}


async def cancel_batch(request: web.Request) -> web.Response:
    record = await _batch(request)
    changed = await request.app[TASKS].batches.cancel(record["id"])
    if changed is None:
        raise GatewayError(f"The batch {record['id']} is {record['status']}: it cannot be "
                           "cancelled.", status=409, type="invalid_request_error",
                           code="batch_not_cancellable")
    return json_response(shown(changed))


async def _file(request: web.Request, file_id: Any = None, param: str = "file_id"
                ) -> dict[str, Any]:
    file_id = file_id if file_id is not None else request.match_info["id"]
    record = await request.app[TASKS].store.file(file_id) if isinstance(file_id, str) \
        else None
    if record is None or record["tenant"] != request[TENANT]:
        raise NotFound(f"No such file: {file_id!r}.", code="file_not_found", param=param)
    return record


async def _batch(request: web.Request) -> dict[str, Any]:
    batch_id = request.match_info["id"]
    record = await request.app[TASKS].store.batch(batch_id)
    if record is None or record["tenant"] != request[TENANT]:
        raise NotFound(f"No such batch: {batch_id!r}.", code="batch_not_found")
    return record


async def _form(request: web.Request, raw: bytes) -> dict[str, Any]:
    """A multipart/form-data body: text fields as strings, files as (name, bytes); parsed
    in a thread (a file of 100 MB takes seconds, which the other requests must not wait).
    """
    if not request.content_type.startswith("multipart/form-data"):
        raise InvalidRequest("Upload a file as multipart/form-data.", code="invalid_upload")
    limit = request.app[CONFIG].tasks.max_file_bytes
    if len(raw) > limit + UPLOAD_OVERHEAD:
        raise GatewayError(f"The file is larger than the limit of {limit} bytes.",
                           status=413, type="invalid_request_error", code="file_too_large")
    boundary = _HEADERS.parsestr(f"Content-Type: {request.headers['Content-Type']}\r\n\r\n"
                                 ).get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise InvalidRequest("The multipart/form-data body names no boundary.",
                             code="invalid_upload")
    return await asyncio.to_thread(_parts, raw, boundary.encode("latin-1", "replace"), limit)


_HEADERS = email.parser.HeaderParser(policy=email.policy.HTTP)
MAX_PARTS = 16
MAX_HEADERS = 8192  # of a part's header lines (aiohttp's limit of a request's header field)


def _parts(body: bytes, boundary: bytes, limit: int) -> dict[str, Any]:
    """The parts of a multipart/form-data body (RFC 7578), found by their delimiters: each
    part's few header lines parsed, its content sliced out once. (A parser of whole MIME
    messages took 620 MB and held the interpreter for 0.7 s on a 100 MB file.)
    """
    delimiter = b"--" + boundary
    fields: dict[str, Any] = {}
    at = body.find(delimiter)
    parts = 0
    while at >= 0:
        at += len(delimiter)
        if body.startswith(b"--", at):
            return fields  # the closing delimiter
        parts += 1
        if parts > MAX_PARTS:  # (each costs its headers' parse: a flood of them, minutes)
            raise InvalidRequest(f"An upload has a file and its purpose: more than "
                                 f"{MAX_PARTS} parts is not one.", code="invalid_upload")
        head_end = body.find(b"\r\n\r\n", at, at + MAX_HEADERS)
        if head_end < 0 and body.find(b"\r\n\r\n", at) >= 0:
            # (a Content-Disposition of many parameters costs its parse far more than its
            # length: 1 MB of them took 50 s and a gigabyte)
            raise InvalidRequest(f"A part's headers are longer than {MAX_HEADERS} bytes.",
                                 code="invalid_upload")
        end = body.find(b"\r\n" + delimiter, head_end + 4) if head_end >= 0 else -1
        if end < 0:
            break
        part = _HEADERS.parsestr(body[at:head_end].decode("utf-8", "surrogateescape").lstrip())
        name = part.get_param("name", header="content-disposition")
        filename = part.get_filename()
        content = body[head_end + 4:end]
        if filename is not None:
            if len(content) > limit:
                raise GatewayError(f"The file is larger than the limit of {limit} bytes.",
                                   status=413, type="invalid_request_error",
                                   code="file_too_large")
            fields[str(name)] = (filename, content)
        elif isinstance(name, str):
            fields[name] = content.decode("utf-8", "replace")
        at = end + 2
    raise InvalidRequest("The multipart/form-data body ends before its closing boundary.",
                         code="invalid_upload")


Handler = Callable[[web.Request], Awaitable[web.Response]]


def _guarded(handler: Handler) -> Handler:
    """A store that cannot answer now (Redis restarting) is a 503 to retry, not a 500."""
    @functools.wraps(handler)
    async def guarded(request: web.Request) -> web.Response:
        try:
            return await handler(request)
        except StoreDown:
            raise Unavailable("The task store is unavailable right now; try again shortly.",
                              retry_after=1) from None
    return guarded


def add_routes(app: web.Application) -> None:
    for method, path, handler in (
            ("POST", "/v1/files", upload), ("GET", "/v1/files", list_files),
            ("GET", "/v1/files/{id}", get_file), ("GET", "/v1/files/{id}/content", file_content),
            ("DELETE", "/v1/files/{id}", delete_file), ("POST", "/v1/batches", create_batch),
            ("GET", "/v1/batches", list_batches), ("GET", "/v1/batches/{id}", get_batch),
            ("POST", "/v1/batches/{id}/cancel", cancel_batch)):
        app.router.add_route(method, path, _guarded(handler))
