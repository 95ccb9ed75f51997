"""Credentials given a value by name: ``DB_PASSWORD=...``, ``aws_secret_access_key = ...``,
``"apiKey": "..."``, ``password: ...``, ``'password' => '...'``, ``requirepass ...``, "the
password is ..." (env, INI, YAML and JSON files, code, a config's directives, prose; in JSON
text too, with its escaped quotes and tabs).

A name ends in one of the words (``WORDS``): a password, a secret, an API key or a token, as
a whole word, after a separator (``DB_PASSWORD``, ``x-api-key``) or a lower-case letter
(``dbPassword``); "pass" and "pwd" only after one (``SMTP_PASS``, not a shell's ``PWD``).
Its value is quoted, or the run of text up to white space or a quote (but for the
punctuation that ends a sentence or a list). What is not a secret is left: a placeholder
(``changeme``, ``${DB_PASSWORD}``, ``<your-token>``, ``%s``), a default of an image's
documents (``POSTGRES_PASSWORD=postgres``), code (``password = args.password``,
``getenv("X")``, ``"&password=" + pw``), a type (``token: string``), a YAML tag (``!Ref``), a
value too short or, for a token, not shaped like one (``eos_token: "</s>"``, ``max_token:
512``, a .NET ``PublicKeyToken``).

What is redacted is the value, so the name stays readable. The word and the character
before it decide everything but the value, so a stream that released the start of a name
before its word arrived says what the whole text says.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

WORDS = (r"pass(?:word|wd|phrase)?|requirepass|pwd|secret(?:[_ -]?access)?(?:[_ -]?key)?"
         r"|api[_ -]?key|token")
# (looked for in case-folded text: one must be in a text for a credential to be in it)
ANCHORS = ("pass", "pwd", "secret", "apikey", "api_key", "api-key", "api key", "token")

_SP = r"(?:[ \t]|\\t)"  # white space, or a tab escaped in JSON
# How a name is given its value: ``=``, ``:``, ``:=``, ``=>`` ("password = x", "password: x",
# Go's, PHP's and Ruby's), in prose ("the password is x"), an XML setting's (key="DbPassword"
# value="x"), or a directive's white space ("requirepass x" in redis.conf, "password x" in
# .netrc, SQL's PASSWORD 'x').
_OPERATOR = (rf"{_SP}{{0,16}}(?::=|=>|[:=]){_SP}{{0,16}}|{_SP}{{1,16}}is:?{_SP}{{1,16}}"
             rf"|{_SP}{{1,16}}value{_SP}{{0,3}}={_SP}{{0,3}}|{_SP}{{1,16}}")
# A quoted value (its quote escaped too, as in JSON text: \"x\"), closed, or cut off by the
# end of the text (an answer cut short); or a bare one.
_QUOTED = (r"(?P<q>\\?[\"'`])(?P<quoted>(?:(?!(?P=q))(?:[^\\\n]|\\[^\n])){1,128}+)"
           r"(?:(?P=q)|\Z)")
_BARE = r"(?P<bare>(?:[^\s\"'`\\]|\\\\){1,128}+)(?![^\s\"'`\\])"
ASSIGNED = re.compile(
    rf"(?P<word>{WORDS})\\?[\"'`]?(?P<op>{_OPERATOR})(?:{_QUOTED}|{_BARE})", re.IGNORECASE)
# What may still grow into one at the end of a text (a stream's): a word, then perhaps (a
# start of) its operator and of its value (looser than the above: it holds a little more);
# or the start of a word.
_OPEN = (
    rf"(?:{WORDS})\\?[\"'`]?{_SP}{{0,16}}(?:(?::=?|=>?|i(?:s:?)?|v(?:a(?:l(?:u(?:e{_SP}{{0,3}}"
    rf"=?)?)?)?)?|\\)(?:{_SP}{{0,16}}|\\)?)?"
    r"(?:(\\?[\"'`])(?:(?!\1)(?:[^\\\n]|\\[^\n])){0,128}+\\?"
    r"|(?:[^\s\"'`\\]|\\\\){0,128}+\\?)?\Z")
OPEN_MAX = 240  # the most an open one takes (a word, its operator, a value of 128)
_SEPARATORS = ("", "_", "-", " ")
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
_WORD = re.compile(WORDS, re.IGNORECASE)
PARTIAL = re.compile(_prefixes(sorted(set(_SPELLINGS))) + r"\Z", re.IGNORECASE)
PARTIAL_MAX = max(map(len, _SPELLINGS))

_NEEDS_NAME = ("pass", "pwd")  # words that are a credential only as the end of a longer name
_GLUED = ("PASSWORD", "PASSWD")  # words that end a name glued on in capitals (PGPASSWORD)
_LINE_END = re.compile(r"[ \t\r]*(?:\n|\Z)")
_TRAILING = ".,;:!?"  # what ends a sentence or a list, not the value before it
_CLOSING = {")": "(", "]": "[", "}": "{", ">": "<"}
_NEXT_FIELD = re.compile(r"&(?=[\w.-]+=)")  # a query's next field (&ssl=true), not a value's
_CODE = re.compile(r"[A-Za-z_$][\w$]*(?:\.[A-Za-z_$][\w$]*)*")  # a name in code, or a type
_CALL = re.compile(r"[A-Za-z_$][\w$.:]*[(\[]")  # a call's or a subscript's start, or a type's
_TEMPLATE = re.compile(
    r"\$\{|\$\(|\{\{|%\(|%[sdr]|<[^>]*>|<[a-z/]|\[REDACTED:|\*{3,}|\.{3}|&#|&[lg]t;|^\$[\w:.]+$"
    r"|^x{3,}$"
    r"|^\{[^{}]*\}$|^![\w:.!]+$|^[a-z][\w+.-]*://", re.I)  # (a YAML tag, !Ref or !vault; a
# reference to where the secret is kept: op://vault/item, vault://)
_CONCATENATED = re.compile(r"^\s+[+.*%]|[+.*%]\s+$")  # a quoted run of code: " + pw + "
_PLACEHOLDER_WORD = re.compile(
    r"(?:^|[-_. ])(?:your|my|here|placeholder|dummy|fake|sample|example|redacted|changeme|"
    r"change|replace|todo|secret|password|passwd|key|token|test|none|null|nil|undefined|"
    r"true|false|required|optional|string|str|bytes|int|env)(?=[-_. ?!]|$)", re.I)
# One of the words starting a part of a value: a name in code (password=self.password, the
# forwarded entity_mask2_token=entity_mask2_token) or, without a digit, a placeholder or a
# constant ("challengePassword"); not a word that merely holds one ("Monkey").
_WORD_INSIDE = re.compile(
    r"(?:^|[-_.]|(?<=[a-z0-9])(?=[A-Z]))(?i:pass(?:word|wd|phrase)?|pwd|secret|key|token)")
# The passwords of the images' and tutorials' own examples (POSTGRES_PASSWORD=postgres).
DEFAULTS = frozenset({
    "postgres", "mysecretpassword", "guest", "root", "admin", "example", "test", "dev",
    "user", "pass", "minioadmin", "default", "rabbitmq", "mysql", "redis", "sa", "wordpress",
    "yourstrong@passw0rd", "yourstrong!passw0rd", "changeit", "notasecret"})
# A token: letters and digits both, 20 or more (not a .NET PublicKeyToken's 16 hex digits)
_TOKEN = re.compile(r"(?=[^\s]*[A-Za-z])(?=[^\s]*\d)[A-Za-z0-9._~+/=:-]{20,}")


def credentials(text: str) -> Iterator[tuple[int, int]]:
    """The spans of the values of the credentials in a text."""
    at = 0
    while (match := ASSIGNED.search(text, at)) is not None:
        if _named(text, match.start(), match.group("word")) and _secret(match, text):
            if match.group("q"):
                yield match.span("quoted")
            else:
                yield match.start("bare"), match.start("bare") + len(_value(match))
            at = match.end()
        else:  # (what it took for a value may hold a name of its own: "pass" : "x DB_PWD=y")
            at = match.start() + 1


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
            word = _WORD.match(found.group())
            if word is not None and _named(text, found.start(), word.group()):
                return found.start()
            found = OPEN.search(text, found.start() + 1)
    if text and (text[-1].isalpha() or text[-1] in "_- "):  # (a word may go on)
        found = PARTIAL.search(text, max(0, len(text) - PARTIAL_MAX))
        while found is not None:
            if _named(text, found.start(), found.group(), partial=True):
                return found.start()
            found = PARTIAL.search(text, found.start() + 1)
    return None


def _named(text: str, at: int, word: str, partial: bool = False) -> bool:
    """Whether the word at ``at`` (or, ``partial``, what may become one) ends a name: it
    starts one, or follows a separator or (as a capital) a lower-case letter or digit, or
    (PASSWORD) capitals; not a URL's user ("smtp://apikey:KEY@host").
    """
    before = text[at - 1] if at else " "
    if before in "_.-" or (word[0].isupper() and (before.islower() or before.isdigit())):
        return True
    if before.isupper() and word.isupper() and any(
            glued.startswith(word) if partial else word.startswith(glued) for glued in _GLUED):
        return True
    return not (before.isalnum() or before in "_/") and \
        (partial or word.lower() not in _NEEDS_NAME)


def _value(match: re.Match[str]) -> str:
    """The value as written: quoted, or bare without the punctuation after it."""
    quoted = match.group("quoted")
    if quoted is not None:
        return quoted
    value = _NEXT_FIELD.split(match.group("bare"), 1)[0].rstrip(_TRAILING)
    while value and value[-1] in _CLOSING and \
            value.count(value[-1]) > value.count(_CLOSING[value[-1]]):
        value = value[:-1].rstrip(_TRAILING)  # ("(the password: x)")
    return value


def _secret(match: re.Match[str], text: str) -> bool:
    word = match.group("word").lower()
    value = _value(match)
    raw = match.group("quoted") or match.group("bare")
    folded = value.lower()
    if not value or _TEMPLATE.search(raw) or folded in DEFAULTS or folded == word or \
            value.endswith("EXAMPLEKEY"):  # (AWS's documents' example secret key)
        return False
    quoted = match.group("quoted") is not None
    if quoted and _CONCATENATED.search(value):
        return False
    digits = any(c.isdigit() for c in value)
    if not digits and (_PLACEHOLDER_WORD.search(value) or _WORD_INSIDE.search(value)):
        return False
    code = not quoted and _CODE.fullmatch(value) is not None
    call = None if quoted else _CALL.match(value)
    if (call is not None and (not any(c.isdigit() for c in call.group())
                              or value[-1] in ")]")) or (not quoted and value[0] in "([{<:") or \
            (code and ("_" in value or "." in value) and _WORD_INSIDE.search(value)):
        # code: a call, a subscript or a type (getenv("X"), env["X"], Optional[str], (self.
        # user + ...); not a password Tr0ub4dor(3xK)!92), a name (settings.API_KEY, hf_token)
        return False
    if value[0] in "/~" or (word in _NEEDS_NAME and value.isdigit()):
        return False  # (a file: ORIG_PWD=/home/me, sudo's NOPASSWD: /bin/x; high_pass = 2000)
    op = match.group("op")
    said = op.replace("\\t", " ").strip()
    if not said and not quoted and not (digits and _directive(match, text)):
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
    return not said.startswith("is") or digits or quoted


def _directive(match: re.Match[str], text: str) -> bool:
    """A line that is the name and its value alone ("requirepass x", "password x")."""
    at = match.start()
    while at > 0 and (text[at - 1].isalnum() or text[at - 1] in "_.-"):
        at -= 1  # (the name's start)
    while at > 0 and text[at - 1] in " \t":
        at -= 1
    return (at == 0 or text[at - 1] == "\n") and \
        _LINE_END.match(text, match.end()) is not None
