"""Credentials given a value by name: ``DB_PASSWORD=...``, ``aws_secret_access_key = ...``,
``"apiKey": "..."``, ``password: ...``, ``'password' => '...'``, ``<password>...</``,
``setPassword("...")``, ``requirepass ...``, ``--password ...``, "the password is ..." (env,
INI, YAML, JSON and XML files, code, a config's directives, a command's flags, prose; in
JSON text too, with its escaped quotes and tabs).

A name ends in one of the words (``WORDS``), perhaps with a suffix (``DB_PASSWORD_PROD``,
``SECRET_KEY_BASE``): a password, a secret, an API key or a token, as a whole word, after
a separator (``DB_PASSWORD``, ``x-api-key``, ``;Pwd=``) or a lower-case letter
(``dbPassword``), or PASSWORD after capitals (``PGPASSWORD``). Its value is quoted (with a
string's prefix: ``f"..."``, ``b'...'``, ``@"..."``, ``N'...'``, or three quotes), or the run
of text up to white space, a double quote, a backtick, a backslash or a closing tag, less
the punctuation that ends a sentence or a list, or a minified object's next field.

What is not a secret is left: a placeholder (``changeme``, ``${DB_PASSWORD}``,
``<your-token>``, ``%s``), a reference to where the secret is kept (``op://vault/item``,
``arn:...``), a default of an image's documents (``POSTGRES_PASSWORD=postgres``), code
(``password = args.password``, ``getenv("X")``, ``"&password=" + pw``,
``$request->input('password')``, ``@password``, ``password==x``), a type (``token:
Optional[str]``), a YAML tag (``!Ref``), a validation rule, a message ("Must be at least 8
characters"), a number with a unit (``high_pass: 80Hz``), a path, a name of words
(``redis-auth-2``), what a name's suffix says is about a credential
(``password_encryption``), a value too short or, for a token, not shaped like one
(``eos_token: "</s>"``, a .NET ``PublicKeyToken``).

What is redacted is the value, so the name stays readable. Only the word, the character
before it, its operator and value, and (for an XML element, a Terraform label) what comes
right after decide: so a stream that released the start of a name before its word arrived
says what the whole text says.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

WORDS = (r"pass(?:word|wd|phrase)?|requirepass|pwd|secret(?:[_ -]?access)?(?:[_ -]?key)?"
         r"|api[_ -]?key|token")
_SUFFIX = r"(?P<suffix>[_-][A-Za-z0-9]{1,12})?"  # DB_PASSWORD_PROD, SECRET_KEY_BASE, API_KEY_2
# (looked for in case-folded text: one must be in a text for a credential to be in it)
ANCHORS = ("pass", "pwd", "secret", "apikey", "api_key", "api-key", "api key", "token")

_SP = "(?:[ \\t\u00a0]|\\\\t)"  # white space, or a tab escaped in JSON
# How a name is given its value: ``=``, ``:``, ``:=``, ``=>`` ("password = x", "password: x",
# Go's, PHP's and Ruby's), in prose ("the password is x"), an XML setting's (key="DbPassword"
# value="x"), an XML element's (<password>x), a call's (setPassword("x"), define('X', 'x')),
# or a directive's white space ("requirepass x" in redis.conf, "--password x", SQL's
# PASSWORD 'x').
_OPERATOR = (rf"{_SP}{{0,32}}(?::=|=>|[:=\uff1a])(?!=){_SP}{{0,32}}|{_SP}{{1,16}}is:?{_SP}{{1,16}}"
             rf"|{_SP}{{1,16}}value{_SP}{{0,3}}={_SP}{{0,3}}|>|,{_SP}{{0,3}}|\(|{_SP}{{1,32}}")
# A quoted value (a string's prefix before it; its quote escaped too, as in JSON text:
# \"x\"), closed, or cut off by the end of the text (an answer cut short); or a bare one.
_QUOTE = r"\"\"\"|'''|\\?[\"'`]"
_QUOTED = (rf"(?:[fFbBrRuU]{{1,2}}|@|N)?(?P<q>{_QUOTE})"
           r"(?P<quoted>(?:(?!(?P=q))(?:[^\\\n]|\\[^\n]))++)(?:(?P=q)|\Z)")
_BARE_FIRST = r"[^\s\"'`\\<]|<(?!/)|\\\\"  # (not a quote: that is a quoted value)
_BARE = rf"(?P<bare>(?:{_BARE_FIRST})(?:{_BARE_FIRST}|')*+)"
ASSIGNED = re.compile(
    rf"(?P<word>{WORDS}){_SUFFIX}(?:\\?[\"'`]\]?)?(?P<op>{_OPERATOR})(?:{_QUOTED}|{_BARE})",
    re.IGNORECASE)
# What may still grow into one at the end of a text (a stream's): a word, then perhaps (a
# start of) its operator and of its value (looser than the above: it holds a little more);
# or the start of a word.
_OPEN = (
    rf"(?:{WORDS})(?:[_-][A-Za-z0-9]{{0,12}})?(?:\\?[\"'`]\]?)?{_SP}{{0,32}}"
    rf"(?:(?::=?|=>?|\uff1a|>|,|\(|i(?:s:?)?|v(?:a(?:l(?:u(?:e{_SP}{{0,3}}=?)?)?)?)?|\\)"
    rf"(?:{_SP}{{0,32}}|\\)?)?"
    r"(?P<value>(?:[fFbBrRuU]{1,2}|@|N)?(?P<quote>\"{1,3}|'{1,3}|\\?[\"'`])"
    r"(?:(?!(?P=quote))(?:[^\\\n]|\\[^\n]))*+\\?"
    rf"|(?:(?:{_BARE_FIRST})(?:{_BARE_FIRST}|')*+)?<?\\?)\Z")
# A stream holds a credential's value this long at most: one that runs on is redacted from
# its start, and the rest of it is dropped as it comes (an AWS session token, 500 or more).
VALUE_HOLD = 256
OPEN_MAX = VALUE_HOLD + 100  # the most an open one takes (its name, its operator, its value)
_OPEN_AFTER = OPEN_MAX - 20  # ... after its word (a word further from the end is not one)
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
_PREFIXES = frozenset(word[:k] for word in _SPELLINGS for k in range(1, len(word) + 1))
_RUN = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_-."  # (of a name)

_NEEDS_NAME = ("pass", "pwd")  # words that are a credential alone only quoted, with a digit
_GLUED = ("PASSWORD", "PASSWD")  # words that end a name glued on in capitals (PGPASSWORD)
_SEPARATOR = "_.-;&?"  # (before a word that ends a name: DB_PASS, x-api-key, ;Pwd=, &pwd=)
_TRAILING = ".,;:!?'"  # what ends a sentence, a list or a string, not the value before it
# Names of what is said about a credential, not of it (password_encryption = scram-sha-256,
# TOKEN_TTL=3600, PASSWORD_FILE=/run/secrets/db)
_ABOUT = frozenset({
    "encryption", "hash", "hashed", "hasher", "length", "len", "policy", "type", "types",
    "file", "path", "dir", "url", "uri", "min", "max", "count", "expiry", "expires", "ttl",
    "lifetime", "header", "name", "id", "prefix", "field", "hint", "endpoint", "mode",
    "algorithm", "algo", "format", "reset", "rules", "regex", "pattern", "label", "env",
    "var", "source", "provider", "store", "manager", "timeout", "limit", "strength", "scope",
    "help", "message", "msg", "error", "errors", "text", "description", "placeholder",
    "prompt", "title", "tooltip"})
_CLOSING = {")": "(", "]": "[", "}": "{", ">": "<"}
_AFTER_VALUE = ".,;:!?')]}><"  # what may follow a value without being part of it
_FIELD_START = re.compile(r"[,;){}][A-Za-z_$]?[\w$-]*\s*\Z")  # a next field, not yet whole
# A minified object's next field ({password:t,token:n}, .btn-pass:hover{color:...}): where
# a bare value ends
_NEXT_FIELD = re.compile(r"[,;){}](?=[A-Za-z_$][\w$-]+\s*[:=])")
_BARE_END = re.compile(r"[\s\"`\\]|</")  # where a value without quotes ends, at the latest
_CODE = re.compile(r"[A-Za-z_$][\w$]*(?:\.[A-Za-z_$][\w$]*)*")  # a name in code, or a type
# A call's or a subscript's start, or a type's (of a name of three or more: P(,+n is none)
_CALL = re.compile(r"[A-Za-z_$][\w$]*(?:(?:\.|::)[A-Za-z_$][\w$]*)*[(\[]")
_TEMPLATE = re.compile(
    r"\$\{|\$\([a-z]|\{\{.*\}\}|\{%|<\?|<%|%\(\w+\)[sd]|(?<![\w%])%[sd](?!\w)"
    r"|<[A-Za-z][\w .-]+>|<(?:span|div|a|p|b|i|em|strong|code|pre|br|td|tr|li)\b"
    r"|\[REDACTED:|\*{3,}|\.{3}|&#x?[0-9a-fA-F]+;|&[lg]t;|^\$[A-Za-z_][\w:.]*$|^\$\w+(?:->|::)"
    r"|^[xX]{3,}$|^\{[^{}]*\}$|^![A-Za-z][A-Za-z:.!]*$"
    # (a YAML tag, !Ref; a reference to where the secret is kept, op://vault/item, arn:...)
    r"|^[a-z][a-z0-9+.-]*://|^(?:urn|arn|vault|ssm|secretsmanager|keyvault|kms):"
    r"|^(?i:[a-z_]+(?::[\w,]+)?(?:\|[a-z_]+(?::[\w,]+)?)+)$"  # (a rule list: required|min:8)
    r"|^(?i:null|true|false|none|nil|undefined|!0|!1)\b")  # (a literal: n.password=null;...)
_CONCATENATED = re.compile(r"^\s+[+.*%]|[+.*%]\s+$")  # a quoted run of code: " + pw + "
_PLACEHOLDER_WORD = re.compile(
    r"(?:^|[-_. ])(?:your|my|here|placeholder|dummy|fake|sample|example|redacted|changeme|"
    r"change|replace|todo|secret|password|passwd|key|token|test|none|null|nil|undefined|"
    r"true|false|required|optional|string|str|bytes|int|env)(?=[-_. ?!,;)]|$)", re.I)
# Words that make any value a placeholder, digits or not (SECRET_KEY=change_me_123)
_PLACEHOLDER = re.compile(r"change[_-]?me|replace[_-]?(?:me|with)|your[_-]|example|placeholder|"
                          r"dummy|generate[_-]|-random-", re.I)
# One of the words starting a part of a value: a name in code (password=self.password, the
# forwarded entity_mask2_token=entity_mask2_token) or, without a digit, a placeholder or a
# constant ("challengePassword"); not a word that merely holds one ("Monkey").
_WORD_INSIDE = re.compile(
    r"(?:^|[-_.]|(?<=[a-z0-9])(?=[A-Z]))(?i:pass(?:word|wd|phrase)?|pwd|secret|key|token)")
# A number, or one with a unit or a range (high_pass: 80Hz, second_pass: 1.5e-3, 8-64)
_SLUG = re.compile(r"[a-z]+(?:[-_][a-z]+)+")
# A name of words with a number (a Kubernetes secret's, my-tls-cert-2, db-password-secret2)
_NAMED = re.compile(r"[a-z]+(?:-[a-z]+)+(?:-?[a-z]*\d{1,2})?|[a-z]+-[a-z]*\d{1,2}")
# Prose: three words or more, one of them a small one (a message: "Must be at least 8
# characters"), not a passphrase ("correct horse battery staple")
_PROSE = re.compile(r"(?i)(?=(?:\S+\s+){2,}\S)(?=.*\b(?:the|a|an|be|is|are|at|of|or|and|to|"
                    r"must|use|least|more|than|with|not|your|characters?|numbers?|minimum)\b)")
_DIGIT = re.compile(r"\d")
_ALNUM = re.compile(r"[^\W_]")
_NUMBER = re.compile(r"\d+(?:[.,:-]\d+)*(?:e[+-]?\d+)?(?:[a-zA-Z%]{1,3})?")
_PATH = re.compile(r"(?:[/~]|\.{1,2}/)(?:[\w.@-]+/)*[\w.@-]*")
_MIXED = re.compile(r"(?=\S*[a-z])(?=\S*[A-Z])(?=\S*\d)[A-Za-z0-9]{12,}")  # random, not a word
_LETTERS = re.compile(r"(?=(?:[a-z]*[A-Z]){8})(?=(?:[A-Z]*[a-z]){8})[A-Za-z]{20,}")  # (random)
# The passwords of the images' and tutorials' own examples (POSTGRES_PASSWORD=postgres).
DEFAULTS = frozenset({
    "postgres", "mysecretpassword", "guest", "root", "admin", "example", "test", "dev",
    "user", "pass", "minioadmin", "default", "rabbitmq", "mysql", "redis", "sa", "wordpress",
    "yourstrong@passw0rd", "yourstrong!passw0rd", "changeit", "notasecret", "android"})
# A token: letters and digits both, 20 or more (not a .NET PublicKeyToken's 16 hex digits)
_TOKEN = re.compile(r"(?=[^\s]*[A-Za-z])(?=[^\s]*\d)[A-Za-z0-9._~+/=:%&-]{20,}")


def credentials(text: str) -> Iterator[tuple[int, int]]:
    """The spans of the values of the credentials in a text."""
    at = 0
    rejected = (0, 0)  # the last match found not to be one, and how many since inside it
    while (match := ASSIGNED.search(text, at)) is not None:
        if _named(text, match.start(), match.group("word")) and _secret(match, text):
            if match.group("q"):
                yield match.span("quoted")
            else:
                yield match.start("bare"), match.start("bare") + len(_value(match))
            at = match.end()
            continue
        # What it took for a value may hold a name of its own ("pass" : "x DB_PWD=y"): the
        # first few are read (not every one: a run of thousands would be read as often)
        end, inside = rejected
        rejected = (end, inside + 1) if match.start() < end else (match.end(), 0)
        at = match.start() + 1 if rejected[1] < 3 else rejected[0]


def open_at_end(text: str, first: int = 0) -> int | None:
    """Where a credential that may still be given its value, or have it grow, starts: a
    word at the end of the text, perhaps with its operator and the start of its value; or
    what may yet become a word (from ``first`` on). (Each word tried once: a text of many
    is read in time in proportion to it.)
    """
    start = max(first, len(text) - OPEN_MAX)
    window = text[start:].lower()  # (a look for the words' stems first: most text has none)
    if "pass" in window or "pwd" in window or "secret" in window or "api" in window or \
            "token" in window:
        for word in _WORD.finditer(text, start):
            if len(text) - word.end() <= _OPEN_AFTER and \
                    _named(text, word.start(), word.group()) and \
                    OPEN.match(text, word.start()) is not None:
                return word.start()
    if text and (text[-1].isalpha() or text[-1] in "_- ") and _may_start(text):
        found = PARTIAL.search(text, max(first, len(text) - PARTIAL_MAX))
        while found is not None:
            if _named(text, found.start(), found.group(), partial=True):
                return found.start()
            found = PARTIAL.search(text, found.start() + 1)
    return None


def held_value(text: str, at: int) -> tuple[int, str] | None:
    """Where the value of the credential open at ``at`` starts, and its quote ("" for none),
    if it is read as a secret so far (a stream's, too long to hold whole: its start is
    redacted, the rest dropped).
    """
    text = text[:at + OPEN_MAX]  # (its start decides)
    found = ASSIGNED.match(text, at)
    if found is None or not _named(text, at, found.group("word")) or not _secret(found, text):
        return None
    quote = found.group("q")
    return (found.start("quoted"), quote) if quote else (found.start("bare"), "")


_QUOTE_BEFORE = re.compile(rf"(?:{_QUOTE})\Z")


def quote_of(text: str, value: int) -> str:
    """The quote a value found at ``value`` is in ("" for none)."""
    found = _QUOTE_BEFORE.search(text, max(0, value - 3), value)
    return found.group() if found else ""


def may_hold(text: str) -> bool:
    """Whether a credential may be open at the end of a text: it holds one of the words'
    stems, or may end with a word's start (a cheap look first: most pieces of an answer
    have neither).
    """
    low = text[-OPEN_MAX:].lower()
    return "pass" in low or "pwd" in low or "secret" in low or "api" in low or \
        "token" in low or (bool(text) and (text[-1].isalpha() or text[-1] in "_- ")
                           and _may_start(text))


def _may_start(text: str) -> bool:
    """Whether a word's start may end the text (a cheap look, most pieces of prose are
    ruled out by): its last run of letters is one, or holds a separator or a capital past
    its first letter (a name's part may be one); or "api " ("api key") may be going on.
    """
    tail = text[-PARTIAL_MAX:]
    run = tail[len(tail.rstrip(_RUN)):]
    if not run:
        return tail[-4:].lower() == "api "
    return run.lower() in _PREFIXES or not run[1:].islower() or "_" in run or "-" in run \
        or "." in run


def _named(text: str, at: int, word: str, partial: bool = False) -> bool:
    """Whether the word at ``at`` (or, ``partial``, what may become one) may end a name: it
    starts one, or follows a separator or (as a capital) a lower-case letter or digit, or
    (PASSWORD) capitals; not a URL's user ("smtp://apikey:KEY@host"), nor a redaction's
    ("[REDACTED:api_key]").
    """
    before = text[at - 1] if at else " "
    if before == ":":  # (a path's part: arn:aws:...:secret:prod/db; or a redaction's)
        return False
    if before in _SEPARATOR or (word[0].isupper() and (before.islower() or before.isdigit())):
        return True
    if before.isupper() and word.isupper() and any(
            glued.startswith(word) if partial else word.startswith(glued) for glued in _GLUED):
        return True
    return not (before.isalnum() or before in "_/")


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
    """Whether what ``match`` found is a secret: its name's, its operator's and its value's
    exceptions, the cheapest first.
    """
    word = match.group("word").lower()
    suffix = match.group("suffix")
    if suffix and suffix[1:].lower() in _ABOUT:
        return False
    quoted = match.group("quoted") is not None
    op = match.group("op")
    said = op.replace("\\t", " ").replace("\u00a0", " ").strip()
    at = match.start()
    before = text[at - 1] if at else " "
    standalone = word in _NEEDS_NAME and before not in _SEPARATOR and not before.isalnum()
    # <password>x: an XML element's; define('DB_PASSWORD', 'x'), setPassword("x"): a
    # call's (not password_hash('sha512'), lookup('password', '/dev/null length=20')); pass:
    # 'x9' (nodemailer's): alone, the word is a credential only so
    if (said in (">", ",", "(") or standalone) and (
            (said == ">" and (before != "<" or not (text.startswith("</", match.end())
                                                    or match.end() == len(text)))) or
            (said != ">" and not quoted) or (said == "(" and suffix) or
            (said == "," and before not in "_-") or
            (standalone and said not in (":", "=", ":=", "=>"))):
        return False
    value = _value(match)
    raw = match.group("quoted") or match.group("bare")
    digits = _DIGIT.search(value) is not None
    if (said == "," or standalone) and not digits:
        return False
    folded = value.lower()
    if _ALNUM.search(value) is None or _TEMPLATE.search(raw) or folded in DEFAULTS or \
            folded == word or value.endswith("EXAMPLEKEY") or _PLACEHOLDER.search(value) or \
            _NAMED.fullmatch(value) or _PROSE.match(value):
        return False  # (EXAMPLEKEY: AWS's documents' example secret key)
    if quoted and (value != value.strip() or _CONCATENATED.search(value)):
        return False  # (`Password:` to `New password:`; " + pw + ")
    if not digits and (_PLACEHOLDER_WORD.search(value) or _WORD_INSIDE.search(value)
                       or _SLUG.fullmatch(value)):
        return False  # (and a name of words: "workload-identity-auth")
    if not quoted and _code(value):
        return False
    if value[0] == "@" and _WORD_INSIDE.search(value[1:]):
        return False  # (an SQL parameter: @password, @NewPassword1)
    if _NUMBER.fullmatch(value) and (word in _NEEDS_NAME or not value.isdigit()
                                     or len(value) < 6):
        return False  # (a filter's high_pass = 2000, 80Hz, 8-64: numbers, not passwords)
    if _PATH.fullmatch(value) and ("/" in value[1:] or value[0] in "~.") and \
            not _MIXED.search(value):
        return False  # (a file: ORIG_PWD=/home/me, sudo's NOPASSWD: /bin/x)
    if not said:  # a directive's white space: requirepass x, --password x, PASSWORD 'x'
        if quoted and (not digits or re.match(r"\s*\{", text[match.end():])):
            return False  # (CMake's CHECK_PASS "found"; Terraform's resource labels)
        if not quoted and not (digits and len(value) >= 8 and any(c.isalpha() for c in value)
                               and ("/" not in value or _MIXED.search(value))):
            return False  # ("password manager", "password twice2": words, not a directive;
            # "-field=password secret/myapp/db2": a path)
    if said.startswith("is") and not quoted and re.search(r"[()'\"]", value):
        return False  # (code: required('Password is required').min(8))
    if word.endswith("token"):
        return _TOKEN.fullmatch(value) is not None
    if len(value) < (4 if word.startswith(("pass", "pwd")) else 8):
        return False
    if not quoted and _CODE.fullmatch(value) and not digits and not _LETTERS.fullmatch(value):
        # a name in code, a type or a word (password = args.password, token: string, the
        # password is wrong); but an env file's PASSWORD=hunter, a query's &password=hunter
        return (match.group("word").isupper() and op == "=") or before in "?&"
    return not said.startswith("is") or digits or quoted


def _code(value: str) -> bool:
    """A bare value that is code: a call, a subscript or a type (getenv("X"), env["X"],
    Optional[str], base64.b64decode(...); not a password such as Tr0ub4dor(3xK)!92), a
    parenthesised expression, a name (settings.API_KEY, hf_token).
    """
    call = _CALL.match(value)
    if call is not None and len(call.group()) > 3 and (
            not any(c.isdigit() for c in call.group()) or "." in call.group()
                             or "_" in call.group() or value[-1] in ")]"):
        return True
    return value[0] in "([{<:" or (_CODE.fullmatch(value) is not None and (
        "_" in value or "." in value) and _WORD_INSIDE.search(value) is not None)


def value_rest(quote: str) -> Callable[[str], tuple[int, bool]]:
    """A reader of the rest of a value (in ``quote``, or without): how much of the text that
    follows is still the value, and whether it ends there (a stream's, of a value too long
    to hold: it is dropped as it comes).
    """
    return _quoted_rest(quote) if quote else _bare_rest


def _bare_rest(text: str) -> tuple[int, bool]:
    """The rest of a credential's value without quotes, as the whole text's value ends:
    before white space, a quote or a backslash, a closing tag ("</password>") or a minified
    object's next field (",user:bob}"), less the punctuation before those ("... ok.", "x)").
    What may yet turn out to be one of those is kept.
    """
    end = _BARE_END.search(text)
    field = _NEXT_FIELD.search(text, 0, len(text) if end is None else end.start())
    if field is not None:
        return field.start(), True
    stop = len(text) if end is None else end.start()
    kept = len(text[:stop].rstrip(_AFTER_VALUE))  # (punctuation that may end the value)
    if end is not None:
        return kept, True
    maybe = _FIELD_START.search(text)  # (",user" may yet be a field: "user:")
    return (kept if maybe is None else min(kept, maybe.start())), False


def _quoted_rest(quote: str) -> Callable[[str], tuple[int, bool]]:
    """A reader of the rest of a credential's quoted value: up to its quote (the whole of
    it: \\" or three), past the escapes within, or the line's end (a quote left open).
    """
    def rest(text: str) -> tuple[int, bool]:
        at = 0
        while at < len(text):
            if text.startswith(quote, at) or text[at] == "\n":
                return at, True
            if text[at] == "\\":
                if at + 1 == len(text):
                    return at, False  # (an escape not yet whole: kept)
                at += 2
                continue
            at += 1
        return max(0, at - len(quote) + 1), False  # (a quote of several, cut, is kept)
    return rest
