"""Tenants: the keys a gateway answers to, and what each may do (models, rates, tokens,
requests at once, a budget), counted in memory or, shared by every process, in Redis.
"""

from gateway.tenants.keys import KeyBook, RedisKeys, amend, described, issue, key_digest
from gateway.tenants.limits import Admission, Limits, MemoryLimits, Tally
from gateway.tenants.link import Away, Link
from gateway.tenants.shared_limits import RedisLimits

__all__ = ["Admission", "Away", "KeyBook", "Limits", "Link", "MemoryLimits", "RedisKeys",
           "RedisLimits", "Tally", "amend", "described", "issue", "key_digest"]
