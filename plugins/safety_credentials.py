"""Credentials given a value by name: ``DB_PASSWORD=...``, ``aws_secret_access_key = ...``,
``"apiKey": "..."``, ``password: ...`` (an env file, an INI or YAML file, JSON, code).

A name ends in one of the words (``WORDS``): a password, a secret, an API key or a token, as
a whole word, after a separator (``DB_PASSWORD``, ``x-api-key``) or a lower-case letter
(``dbPassword``); "pass" and "pwd" only after one (``SMTP_PASS``, not a shell's ``PWD``).
Its value is what comes after ``=`` or ``:``, quoted or up to white space. What is not a
secret is left: a placeholder (``changeme``, ``${DB_PASSWORD}``, ``<your-token>``), a name
in code (``password = args.password``, TypeScript's ``token: string``), a value too short
or, for a token, not shaped like one (``eos_token: "</s>"``, ``max_token: 512``).

What is redacted is the value, so the name stays readable. The word and the character
before it decide everything but the value, so a stream that released the start of a name
before its word arrived says what the whole text says.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

WORDS = (r"pass(?:word|wd|phrase)?|requirepass|pwd|secret(?:[_-]?access)?(?:[_-]?key)?"
         r"|api[_-]?key|token")
# (looked for in case-folded text: one must be in a text for a credential to be in it)
ANCHORS = ("pass", "pwd", "secret", "apikey", "api_key", "api-key", "token")

# How a name is given its value: ``=`` or ``:`` ("password = x", "password: x"), in prose
# ("the password is x"), an XML setting's (key="DbPassword" value="x"), or a directive's
# white space ("requirepass x" in redis.conf, "password x" in .netrc, SQL's PASSWORD 'x').
_OPERATOR = r"[ \t]{0,3}[:=][ \t]{0,3}|[ \t]+is:?[ \t]+|[ \t]+value[ \t]*=[ \t]*|[ \t]+"
_QUOTED = r"(?P<q>[\"'])(?P<quoted>(?:(?!(?P=q))[^\\\n]|\\[^\n]){1,128}+)(?P=q)"
_BARE = r"(?P<bare>[^\s\"'`,;()\[\]{}<>\\]{1,128}+)(?=[\s,;\\\"']|\Z)"
ASSIGNED = re.compile(
    rf"(?P<word>{WORDS})[\"']?(?P<op>{_OPERATOR})(?:{_QUOTED}|{_BARE})", re.IGNORECASE)
# What may still grow into one at the end of a text (a stream's): a word, then perhaps (a
# start of) its operator and of its value (looser than the above: it holds a little more);
# or the start of a word.
_OPEN = (
    rf"(?:{WORDS})[\"']?[ \t]{{0,8}}(?:(?:[:=]|i(?:s:?)?|v(?:a(?:l(?:u(?:e[ \t]{{0,3}}=?)?)?)?)?)"
    rf"[ \t]{{0,8}})?"
    rf"(?:([\"'])(?:(?!\1)[^\\\n]|\\[^\n]){{0,128}}+\\?|[^\s\"'`,;()\[\]{{}}<>\\]{{0,128}}+)?\Z")
OPEN_MAX = 180  # the most an open one takes (a word, its operator, a value of 128)
_SEPARATORS = ("", "_", "-")
_SPELLINGS = ("password", "passwd", "passphrase", "requirepass", "pwd", "token",
              *(f"api{s}key" for s in _SEPARATORS),
              *(f"secret{access}{key}" for access in ("", *(s + "access" for s in _SEPARATORS))
                for key in ("", *(s + "key" for s in _SEPARATORS))))


def _prefixes(words: list[str]) -> str:
    """A pattern of the words' beginnings: "ab", "ac" as a(?:b|c)?."""
    heads: dict[str, list[str]] = {}
    for word in words:
        if word:
            heads.setdefault(word[0], []).append(word[1:])
    return "(?:" + "|".join(re.escape(head) + (f"{_prefixes(rest)}?" if any(rest) else "")
                            for head, rest in sorted(heads.items())) + ")"


OPEN = re.compile(_OPEN, re.IGNORECASE)
PARTIAL = re.compile(_prefixes(sorted(set(_SPELLINGS))) + r"\Z", re.IGNORECASE)
PARTIAL_MAX = max(map(len, _SPELLINGS))

_NAME = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-"  # (a name's start)
_NEEDS_NAME = ("pass", "pwd")  # words that are a credential only as the end of a longer name
_CODE = re.compile(r"[A-Za-z_$][\w$]*(?:\.[A-Za-z_$][\w$]*)*")  # a name in code, or a type
_TEMPLATE = re.compile(r"\$\{|\{\{|%\(|<[^>]*>|\[REDACTED:|\*{3,}|\.{3}|^\$\w+$|^x{3,}$", re.I)
_PLACEHOLDER_WORD = re.compile(
    r"(?:^|[-_. ])(?:your|my|here|placeholder|dummy|fake|sample|example|redacted|changeme|"
    r"change|replace|todo|secret|password|passwd|key|token|test|none|null|nil|undefined|"
    r"true|false|required|optional|string|str|bytes|int|env)(?=[-_. ?!]|$)", re.I)
# One of the words inside a value: a name in code (password=self.password, the forwarded
# entity_mask2_token=entity_mask2_token) or, without a digit, a placeholder or a constant
# ("challengePassword")
_WORD_INSIDE = re.compile(r"pass(?:word|wd|phrase)?|pwd|secret|key|token", re.I)
# The passwords of the images' and tutorials' own examples (POSTGRES_PASSWORD=postgres).
DEFAULTS = frozenset({
    "postgres", "mysecretpassword", "guest", "root", "admin", "example", "test", "dev",
    "user", "pass", "minioadmin", "default", "rabbitmq", "mysql", "redis", "sa"})
_TOKEN = re.compile(r"(?=[^\s]*[A-Za-z])(?=[^\s]*\d)[A-Za-z0-9._~+/=:-]{16,}")


def credentials(text: str) -> Iterator[tuple[int, int]]:
    """The spans of the values of the credentials in a text."""
    for match in ASSIGNED.finditer(text):
        if _named(text, match.start(), match.group("word")) and _secret(match, text):
            if match.group("q"):
                yield match.span("quoted")
            else:  # (not the full stop after it)
                yield match.start("bare"), match.end() - match.group("bare").endswith(".")


def open_at_end(text: str) -> int | None:
    """Where a credential that may still be given its value, or have it grow, starts: a
    word at the end of the text, perhaps with its operator and the start of its value; or
    what may yet become a word.
    """
    start = max(0, len(text) - OPEN_MAX)
    window = text[start:].lower()  # (a look for the words' stems first: most text has none)
    if "pass" in window or "pwd" in window or "secret" in window or "api" in window or \
            "token" in window:
        found = OPEN.search(text, start)
        while found is not None:
            if _named(text, found.start(), found.group()):
                return found.start()
            found = OPEN.search(text, found.start() + 1)
    found = PARTIAL.search(text, max(0, len(text) - PARTIAL_MAX))
    while found is not None:
        if _named(text, found.start(), found.group() + "x"):
            return found.start()
        found = PARTIAL.search(text, found.start() + 1)
    return None


def _named(text: str, at: int, word: str) -> bool:
    """Whether the word at ``at`` ends a name: it starts one, or follows a separator or (as
    a capital) a lower-case letter or digit; not a URL's user ("smtp://apikey:KEY@host").
    """
    before = text[at - 1] if at else " "
    if before in "_.-" or (word[0].isupper() and (before.islower() or before.isdigit())):
        return True
    return not (before.isalnum() or before in "_/") and word.lower() not in _NEEDS_NAME


def _secret(match: re.Match[str], text: str) -> bool:
    word = match.group("word").lower()
    value = match.group("quoted") or match.group("bare").removesuffix(".")
    folded = value.lower()
    if _TEMPLATE.search(value) or folded in DEFAULTS or folded == word or \
            value.endswith("EXAMPLEKEY"):  # (AWS's documents' example secret key)
        return False
    digits = any(c.isdigit() for c in value)
    if not digits and (_PLACEHOLDER_WORD.search(value) or _WORD_INSIDE.search(value)):
        return False
    code = match.group("bare") is not None and _CODE.fullmatch(value) is not None
    if code and _WORD_INSIDE.search(value):
        return False
    op = match.group("op")
    said = op.strip()
    if not said and match.group("bare") is not None and not (digits and _directive(match, text)):
        return False  # ("password manager", a line's "password changes.": not a directive)
    if word.endswith("token"):
        return _TOKEN.fullmatch(value) is not None
    if len(value) < (4 if word.startswith(("pass", "pwd")) else 8):
        return False
    if code and not digits:
        # a name in code, a type or a word (password = args.password, token: string, the
        # password is wrong); but an env file's PASSWORD=hunter, a query's &password=hunter
        at = match.start()
        return (match.group("word").isupper() and op == "=") or \
            (at > 0 and text[at - 1] in "?&")
    return not said.startswith("is") or digits or match.group("quoted") is not None


def _directive(match: re.Match[str], text: str) -> bool:
    """A line that is the name and its value alone ("requirepass x", "password x")."""
    line = text.rfind("\n", 0, match.start()) + 1
    end = text.find("\n", match.end())
    return not text[line:match.start()].lstrip().strip(_NAME) and \
        not text[match.end():len(text) if end < 0 else end].strip()
