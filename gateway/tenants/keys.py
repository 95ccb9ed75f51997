"""The keys a gateway answers to: named keys with what each may do (the config's
``[[keys]]``, or Redis when ``[tenants] store = "redis"``), and the older unnamed
``[auth] key_hashes`` (keys without limits). Only SHA-256 digests are kept.

Keys in Redis are looked up again at most every ``RECHECK`` seconds by each process, so a
key revoked through one process stops working on all of them within that time. ``issue``,
``amend`` and ``described`` are what the admin API and ``gateway keys`` share.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import secrets
import time
from collections.abc import Callable, Iterable
from typing import Any

import orjson

from gateway.config import ConfigError, KeyConfig
from gateway.errors import Unavailable
from gateway.tenants.link import Away, Link
from gateway.typed_toml import build

RECHECK = 0.5  # seconds a process trusts what it last read of a key in Redis
UNKNOWN_KEPT = 1024  # digests remembered as unknown (beyond that, forgotten)
# The records (id → record) and the index (digest → id), read and written together by
# scripts: on a Redis Cluster under one hash tag (one slot); on a plain Redis under the
# names they have always had there (processes of earlier versions go on beside new ones).
PLAIN = ("gw:keys", "gw:keys:by-digest")
CLUSTER = ("gw:{keys}:records", "gw:{keys}:by-digest")


# What may be changed of a key once issued (its id, hash and birth stay).
SETTINGS = ("name", "expires", "models", "rpm", "tpm", "concurrency", "budget",
            "budget_period", "cache", "revoked")


def key_digest(key: str) -> str:
    """The SHA-256 of a key (bytes that were not UTF-8 count as they came)."""
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def digest_of(hash_text: str) -> str:
    return hash_text.removeprefix("sha256:")


def new_secret() -> str:
    return "gw-" + secrets.token_urlsafe(32)


def issue(settings: dict[str, Any], source: str) -> tuple[str, KeyConfig]:
    """A new key (the secret, shown once) and its record: ``settings`` checked as the
    config's ``[[keys]]`` are (a ``ConfigError`` naming ``source`` otherwise); an id made
    up when none is given.
    """
    unknown = set(settings) - {"id", *SETTINGS}
    if unknown:
        raise ConfigError(f"{source}: {sorted(unknown)[0]}: not a setting of a key (known: "
                          f"id, {', '.join(SETTINGS)})")
    secret = new_secret()
    fields = {"id": f"key-{secrets.token_hex(4)}", **settings, "hash": key_digest(secret),
              "created": int(time.time())}
    record = build(KeyConfig, fields, source)
    if 0 < record.expires <= record.created:
        moment = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(record.expires))
        raise ConfigError(f"{source}: expires: {moment} is past: the key would never work")
    return secret, record


def amend(record: KeyConfig, changes: dict[str, Any], source: str) -> KeyConfig:
    """``record`` with ``changes`` to its settings, checked."""
    fixed = set(changes) - set(SETTINGS)
    if fixed:
        raise ConfigError(f"{source}: {sorted(fixed)[0]}: cannot be changed (what can: "
                          f"{', '.join(SETTINGS)})")
    fields = {**dataclasses.asdict(record), "models": list(record.models), **changes}
    return build(KeyConfig, fields, source)


def described(record: KeyConfig, source: str) -> dict[str, Any]:
    """A key as the admin API and ``gateway keys list`` show it: never its hash."""
    shown = dataclasses.asdict(record)
    del shown["hash"]
    shown["models"] = list(record.models)
    shown["source"] = source
    return shown


def unnamed(digest: str) -> KeyConfig:
    """An ``[auth] key_hashes`` key: no name, no limits."""
    return KeyConfig(id=digest[:16], hash=digest)


class KeyBook:
    """Finds a key's record by the digest of what a client presented."""

    def __init__(self, keys: Iterable[KeyConfig], unnamed_hashes: Iterable[str],
                 shared: RedisKeys | None = None) -> None:
        self._local = {digest_of(h): unnamed(digest_of(h)) for h in unnamed_hashes}
        self._local.update({digest_of(k.hash): k for k in keys})
        self._local_ids = {k.id for k in self._local.values()}
        self.shared = shared

    @property
    def required(self) -> bool:
        """Whether requests need a key at all."""
        return bool(self._local) or self.shared is not None

    async def find(self, digest: str) -> KeyConfig | None:
        found = self._local.get(digest)
        if found is None and self.shared is not None:
            found = await self.shared.find(digest)
            if found is not None and found.id in self._local_ids:
                return None  # an id of the config's: one tenant must not have two keys
        return found

    async def by_id(self, key_id: str) -> KeyConfig | None:
        """The key with this id, the config's or one in Redis (raises ``Away`` when Redis
        does not answer).
        """
        found = self.local(key_id)
        if found is None and self.shared is not None:
            found = await self.shared.get(key_id)
        return found

    def configured(self) -> list[KeyConfig]:
        return list(self._local.values())

    def local(self, key_id: str) -> KeyConfig | None:
        """The key of the config with this id."""
        return next((k for k in self._local.values() if k.id == key_id), None)


class RedisKeys:
    """Named keys in Redis: the records and their index by digest (``PLAIN``, ``CLUSTER``)."""

    def __init__(self, link: Link) -> None:
        self.link = link
        self._find = link.script(FIND)
        self._create = link.script(CREATE)
        self._swap = link.script(SWAP)
        self._seen: dict[str, tuple[float, KeyConfig]] = {}  # digest → (until, its record)
        # Digests found to be no key's, and until when (kept apart: a spray of made-up keys,
        # which empties these, must not make the process forget the keys it knows, which
        # keep working on what was last read while Redis is away)
        self._unknown: dict[str, float] = {}

    async def start(self) -> None:
        await self.link.start()

    @property
    def _names(self) -> tuple[str, str]:
        """(records, by digest) for the Redis there is."""
        return CLUSTER if self.link.cluster else PLAIN

    async def find(self, digest: str) -> KeyConfig | None:
        now = time.monotonic()
        seen = self._seen.get(digest)
        if seen is not None and seen[0] > now:
            return seen[1]
        unknown = self._unknown.get(digest)
        if unknown is not None and unknown > now:
            return None
        try:
            raw = await self.link.call(lambda: self._find(self._names[::-1], [digest]))
        except Away:
            if seen is not None:  # Redis is away: what was last known stands
                return seen[1]
            if unknown is not None:
                return None
            raise Unavailable("The store of API keys is unavailable right now.",
                              retry_after=1, code="key_store_unavailable") from None
        record = _record(raw) if raw else None
        if record is not None and digest_of(record.hash) != digest:
            record = None  # the id was given to another key since
        if record is None:
            self._seen.pop(digest, None)  # (deleted since)
            if len(self._unknown) >= UNKNOWN_KEPT:
                self._unknown.clear()  # digests made up to fill memory
            self._unknown[digest] = now + RECHECK
        else:
            self._seen[digest] = (now + RECHECK, record)
            self._unknown.pop(digest, None)
        return record

    async def all(self) -> list[KeyConfig]:
        raw = await self.link.call(lambda: self.link.client.hgetall(self._names[0]))
        return sorted((r for r in map(_record, raw.values()) if r), key=lambda r: r.created)

    async def get(self, key_id: str) -> KeyConfig | None:
        raw = await self.link.call(lambda: self.link.client.hget(self._names[0], key_id))
        return _record(raw) if raw else None

    async def create(self, record: KeyConfig) -> bool:
        """Store a new key; False when its id is taken."""
        args: list[str | bytes] = [record.id, orjson.dumps(dataclasses.asdict(record)),
                                   digest_of(record.hash)]
        created = await self.link.call(lambda: self._create(self._names, args))
        return bool(created)

    async def change(self, key_id: str, edit: Callable[[KeyConfig], KeyConfig]
                     ) -> KeyConfig | None:
        """Change a key's record (settings, revoked) to what ``edit`` makes of it as it is
        now, written only if nobody changed it meanwhile, else made again from the new one:
        a revocation is never undone by a change made at the same moment. None: no such
        key.
        """
        names = self._names
        for _ in range(CHANGE_TRIES):
            raw = await self.link.call(lambda: self.link.client.hget(names[0], key_id))
            record = _record(raw) if raw else None
            if record is None:
                return None
            changed = edit(record)
            args = [key_id, raw, orjson.dumps(dataclasses.asdict(changed))]
            if await self.link.call(functools.partial(self._swap, names[:1], args)):
                self._seen.pop(digest_of(changed.hash), None)
                return changed
        raise Away(f"the key {key_id!r} kept changing")


# A key's record by the digest of its secret, in one step. KEYS: by-digest, records.
FIND = """
local id = redis.call('HGET', KEYS[1], ARGV[1])
if not id then return false end
return redis.call('HGET', KEYS[2], id)
"""

# A key's record replaced, unless it changed since it was read. KEYS: records. ARGV: id,
# the record as read, the new record.
SWAP = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
"""
CHANGE_TRIES = 20  # reads and writes of a key changed by others meanwhile, before giving up

# A new key, unless its id is taken. KEYS: records, by-digest. ARGV: id, record, digest.
CREATE = """
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[3], ARGV[1])
return 1
"""

def _record(raw: Any) -> KeyConfig | None:
    try:
        data = orjson.loads(raw)
        data["models"] = tuple(data.get("models") or ())
        return KeyConfig(**data)
    except (orjson.JSONDecodeError, TypeError):
        return None
