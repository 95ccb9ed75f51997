"""The admin API (an admin key required, ``[auth] admin_key_hashes``): the named keys.

``GET /admin/keys`` lists them, ``POST`` issues one (its secret is in that answer only),
``GET``, ``PATCH`` and ``DELETE /admin/keys/{id}`` show, change and revoke one. Keys kept in
Redis (``[tenants] store = "redis"``) are changed for every gateway process at once; those
in the config file are shown, and changed by editing the file.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from gateway.config import ConfigError, KeyConfig
from gateway.errors import GatewayError, InvalidRequest, NotFound, Unavailable
from gateway.http.bodies import body_of
from gateway.http.middlewares import json_response
from gateway.keys import KEYBOOK
from gateway.tenants import Away, RedisKeys, amend, described, issue

SOURCE = "request body"


async def list_keys(request: web.Request) -> web.Response:
    book = request.app[KEYBOOK]
    data = [described(k, "config") for k in book.configured()]
    if book.shared is not None:
        data += [described(k, "redis") for k in await _shared_call(book.shared.all())]
    return json_response({"object": "list", "data": data})


async def create_key(request: web.Request) -> web.Response:
    shared = _shared(request)
    fields = _fields(await body_of(request))
    secret, record = _checked(lambda: issue(fields, SOURCE))
    if request.app[KEYBOOK].local(record.id) is not None or \
            not await _shared_call(shared.create(record)):
        raise GatewayError(f"A key with the id {record.id!r} exists already.", status=409,
                           type="invalid_request_error", code="key_exists", param="id")
    return json_response({**described(record, "redis"), "key": secret}, status=201)


async def get_key(request: web.Request) -> web.Response:
    record, source = await _find(request)
    return json_response(described(record, source))


async def change_key(request: web.Request) -> web.Response:
    fields = _fields(await body_of(request))
    changed = await _change(request, lambda record: _checked(
        lambda: amend(record, fields, SOURCE)))
    return json_response(described(changed, "redis"))


async def revoke_key(request: web.Request) -> web.Response:
    """Revoking keeps the record (who had it, since when) but the key no longer works, on
    any process, within a second.
    """
    revoked = await _change(request, lambda record: amend(record, {"revoked": True}, SOURCE))
    return json_response(described(revoked, "redis"))


async def _change(request: web.Request, edit: Callable[[KeyConfig], KeyConfig]
                  ) -> KeyConfig:
    await _find(request, changing=True)  # (one in the config file: changed there)
    key_id = request.match_info["id"]
    changed = await _shared_call(_shared(request).change(key_id, edit))
    if changed is None:
        raise NotFound(f"No key with the id {key_id!r}.", code="key_not_found")
    return changed  # type: ignore[no-any-return]


def add_routes(app: web.Application) -> None:
    app.router.add_get("/admin/keys", list_keys)
    app.router.add_post("/admin/keys", create_key)
    app.router.add_get("/admin/keys/{id}", get_key)
    app.router.add_patch("/admin/keys/{id}", change_key)
    app.router.add_delete("/admin/keys/{id}", revoke_key)


async def _find(request: web.Request, changing: bool = False) -> tuple[KeyConfig, str]:
    key_id = request.match_info["id"]
    book = request.app[KEYBOOK]
    record = book.local(key_id)
    if record is not None:
        if changing:
            raise _in_config(f"The key {key_id!r} is in the config file: change it there.")
        return record, "config"
    if book.shared is not None:
        record = await _shared_call(book.shared.get(key_id))
        if record is not None:
            return record, "redis"
    raise NotFound(f"No key with the id {key_id!r}.", code="key_not_found")


def _shared(request: web.Request) -> RedisKeys:
    shared = request.app[KEYBOOK].shared
    if shared is None:
        raise _in_config('Keys are kept in the config file ([tenants] store = "config"): add '
                         'them there (gateway keys new prints a [[keys]] block), or keep them '
                         'in Redis with [tenants] store = "redis" to manage them here.')
    return shared


def _in_config(message: str) -> GatewayError:
    return GatewayError(message, status=409, type="invalid_request_error",
                        code="keys_in_config")


def _fields(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequest("The body must be a JSON object of a key's settings.")
    return body


def _checked(make: Any) -> Any:
    try:
        return make()
    except ConfigError as exc:
        raise InvalidRequest(str(exc), code="invalid_key_settings") from None


async def _shared_call(call: Any) -> Any:
    try:
        return await call
    except Away:
        raise Unavailable("The store of API keys (Redis) does not answer; retry shortly.",
                          retry_after=1, code="key_store_unavailable") from None
