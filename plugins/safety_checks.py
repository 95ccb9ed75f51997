"""Checks of what a safety rule's pattern found, where the pattern alone would cry wolf:
Luhn for card numbers, mod-97 for IBANs, digit counts for phone numbers, placeholders for
passwords in URLs, documentation domains and code for e-mail addresses; and the finder of
private keys.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Protocol

from plugins.safety_credentials import DEFAULTS, credentials
from plugins.safety_keys import keys


class Text(Protocol):
    """What a check reads of the text (``plugins.safety_rules.Text``)."""

    text: str

    def line_start(self, at: int) -> int: ...
    def fenced(self, at: int) -> bool: ...


def luhn(digits: str) -> bool:
    total = 0
    for i, char in enumerate(reversed(digits)):
        n = ord(char) - 48
        if i % 2:
            n = n * 2 - 9 if n > 4 else n * 2
        total += n
    return total % 10 == 0


# The card networks' number prefixes, each with the lengths its numbers come in: Visa,
# Mastercard, American Express, Discover, JCB. (An 18-digit id that starts with 4 and
# happens to pass Luhn, as one in ten do, is no card.)
_CARDS = ((re.compile(r"4"), (13, 16, 19)),
          (re.compile(r"5[1-5]|2(?:2[2-9]|[3-6]\d|7[01]|720)"), (16,)),
          (re.compile(r"3[47]"), (15,)),
          (re.compile(r"6(?:011|5|4[4-9])|35"), (16, 17, 18, 19)))


def card(match: re.Match[str], text: Text) -> bool:
    digits = re.sub(r"\D", "", match.group())
    return any(prefix.match(digits) is not None and len(digits) in lengths
               for prefix, lengths in _CARDS) and luhn(digits)


IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BR": 29, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20,
    "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27,
    "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30,
    "KZ": 20, "LB": 28, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MD": 24, "ME": 22,
    "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15, "PK": 24, "PL": 28, "PS": 29,
    "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24, "SE": 24, "SI": 19, "SK": 24, "SM": 27,
    "TN": 24, "TR": 26, "UA": 29, "VG": 24, "XK": 20,
}


def iban_valid(iban: str) -> bool:
    iban = iban.replace(" ", "").upper()
    if IBAN_LENGTHS.get(iban[:2]) != len(iban):
        return False
    rearranged = iban[4:] + iban[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def iban(match: re.Match[str], text: Text) -> bool:
    return iban_valid(match.group())


def phone(match: re.Match[str], text: Text) -> bool:
    digits = sum(c.isdigit() for c in match.group())
    return 10 <= digits <= 15


_EXAMPLE_DOMAIN = re.compile(
    r"(?:^|\.)(?:example\.(?:com|org|net)|[^.]+\.(?:test|example|invalid|localhost))$", re.I)
_COMMENT_LINE = re.compile(r"[ \t]*(?:#|//|/?\*|--|;|%|<!--|\")")  # matched from a line's start
_CODE_MARKERS = ("__author__", "@author", "author", "maintainer", "copyright", "email =")


def email(match: re.Match[str], text: Text) -> bool:
    """An address someone could be reached at: not a documentation domain, not the
    ``user:password@host`` of a URL, and not the author line of a piece of code (which is
    what code pasted into a prompt carries).
    """
    if _EXAMPLE_DOMAIN.search(match.group().rpartition("@")[2]):
        return False
    before = text.text[max(0, match.start() - 256):match.start()]
    if "://" in before[max(before.rfind(" "), before.rfind("\n")) + 1:]:
        return False
    if text.fenced(match.start()):
        return False
    start = text.line_start(match.start())
    if _COMMENT_LINE.match(text.text, start, match.start()):
        return False
    near = text.text[max(start, match.start() - 120):match.end() + 120].split("\n", 1)[0]
    return not any(marker in near.lower() for marker in _CODE_MARKERS)


# What a key in a README, a tutorial or the vendor's own documentation holds instead of a
# key ("sk-your-api-key-goes-here", "sk-xxxxxxxx"): no digit at all, and a word of the kind
# set apart by dashes, or a run of x (a real key's random characters, digits among them,
# are left however they are dressed up); and AWS's own example key.
_KEY_PLACEHOLDER = re.compile(
    r"(?:^|[-_.])(?i:your|here|placeholder|dummy|fake|sample|example|redacted|key|access|"
    r"token)(?=[-_.]|$)"
    r"|(?i:x{6,})|\*{3,}")
# A key's fixed prefix, digits and all ("sk-ant-api03-"), before what is its own.
_KEY_PREFIX = re.compile(r"sk-(?:proj-|svcacct-|admin-|ant-(?:api|admin)\d\d-)?|ya29\.")


def api_key(match: re.Match[str], text: Text) -> bool:
    found = match.group()
    if found.startswith(("AKIA", "ASIA")) and found.endswith("EXAMPLE"):
        return False  # (AWS's documents' example keys: AKIAIOSFODNN7EXAMPLE...)
    return not placeholder_key(found)


def placeholder_key(found: str) -> bool:
    own = found[_prefix_end(found):]
    return not any(c.isdigit() for c in own) and _KEY_PLACEHOLDER.search(own) is not None


def _prefix_end(key: str) -> int:
    prefix = _KEY_PREFIX.match(key)
    return prefix.end() if prefix else 0


_PROSE = re.compile(r"[a-z]+(?:/[a-z]+)+")  # "authentication/authorization", lower case


def bearer_token(match: re.Match[str], text: Text) -> bool:
    """Not prose about the scheme: "Bearer authentication/authorization flows"."""
    found = match.group()
    return found[:6].lower() != "bearer" or \
        _PROSE.fullmatch(found[6:].strip().rstrip(".")) is None


# host:8080?next=me@...: a port, then a query's first field (not "1?Qz9!x", a password)
_PORT_AND_QUERY = re.compile(r"\d{1,5}\?[\w.%-]*=")

_PLACEHOLDER = re.compile(
    r"^(?:pass(?:word|wd)?|secret|changeme|token|x+|\*+|\.+|<[^>]*>|\$\{?\w+\}?|\{+\w+\}+|"
    r"%\w+%|your[-_]\w+|your(?:pass(?:word)?|secret|token|key|pwd)\w*|\w*[-_]here|pwd|"
    r"redacted)$", re.I)


def url_password(match: re.Match[str], text: Text) -> bool:
    secret = match.group("secret")
    if _PORT_AND_QUERY.match(secret):
        return False
    user = match.group()[3:].partition(":")[0]
    # (the images' and tutorials' own passwords, postgres:postgres@db, guest:guest@rabbitmq,
    # root:example@mongo, are left: redacted, a compose file's connection string no longer
    # works)
    return not (_PLACEHOLDER.match(secret) or secret.lower() in DEFAULTS
                or (secret == user and len(secret) <= 16))


def private_keys(text: Text) -> Iterator[tuple[int, int]]:
    return keys(text.text)


def assigned_credentials(text: Text) -> Iterator[tuple[int, int]]:
    """Credentials given a value by name, but for a key's placeholder ("sk-ant-api03-your-
    key-here", as an API key's is read).
    """
    return ((start, end) for start, end in credentials(text.text)
            if not placeholder_key(text.text[start:end]))
