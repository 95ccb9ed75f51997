"""The checks inside the plugins: output redaction however a stream is cut into chunks, and
how little it holds back; repetition loops; JSON and schema checks.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.protocol.openai import parse_chat
from gateway.protocol.units import Chunk, Completion
from plugins.base import RequestContext
from plugins.qa import QualityOptions, QualityPlugin, json_problem, looping
from plugins.safety import SafetyOptions, SafetyPlugin, StreamRedactor
from plugins.safety_checks import iban_valid, luhn
from plugins.safety_rules import BY_NAME, OUTPUT_RULES, RULES, Rule, Text

SECRET_TEXT = (
    "Use key sk-proj-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789 and the header Authorization: "
    "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dBjftJeZ4CVPmB92K27uhbUJU1p1r ok. "
    "Connect to postgres://admin:Zx9kq2@db.internal:5432/app then\n"
    "-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA0Z3VS5JJcds3xfn/ygWyF8PbnGy0AHB7MhgHcTz6\n"
    "aNaWkr+jzLIz0Z3VS5JJcds3xfn\n-----END RSA PRIVATE KEY-----\n"
    "A certificate is fine: -----BEGIN CERTIFICATE----- MIIB -----END CERTIFICATE----- and "
    "so is the task-list, a sky that is blue, and ghp_short.")
EXPECTED = (
    "Use key [REDACTED:api_key] and the header Authorization: [REDACTED:bearer_token] ok. "
    "Connect to postgres://admin:[REDACTED:url_password]@db.internal:5432/app then\n"
    "[REDACTED:private_key]\n"
    "A certificate is fine: -----BEGIN CERTIFICATE----- MIIB -----END CERTIFICATE----- and "
    "so is the task-list, a sky that is blue, and ghp_short.")


def redact_in_pieces(text: str, sizes: random.Random | None, max_block: int = 16384
                     ) -> tuple[str, int]:
    redactor = StreamRedactor(list(OUTPUT_RULES), max_block)
    out, i, held = [], 0, 0
    while i < len(text):
        n = sizes.randint(1, 8) if sizes else len(text)
        out.append(redactor.feed(text[i:i + n]))
        held = max(held, len(redactor.pending))
        i += n
    out.append(redactor.flush())
    return "".join(out), held


def test_redaction_is_the_same_however_the_stream_is_cut() -> None:
    assert redact_in_pieces(SECRET_TEXT, None)[0] == EXPECTED
    for seed in range(300):
        assert redact_in_pieces(SECRET_TEXT, random.Random(seed))[0] == EXPECTED, seed


def test_prose_is_not_held_back() -> None:
    redactor = StreamRedactor(list(OUTPUT_RULES), 16384)
    prose = "The quick brown fox jumps over the lazy dog and then sleeps"
    for word in prose.split():
        assert redactor.feed(word + " ") == word + " "


V = "Qx7" + "aB3dE5fG7h" * 26  # (longer than a stream holds of a value)


@pytest.mark.parametrize("text", [
    "{password:" + V + ",user:bob} ok", "(password: " + V + ") ok", "<password>" + V +
    "</password> ok", '{"content": "{\\"password\\": \\"' + V + '\\", \\"u\\": 1}"}',
    '{"password": "' + V + '\\"Tail9Secret7Zq", "u": 1}', "mytool --password i" + V + " --u b",
    "export OPENAI_API_KEY=sk-proj-Ab3dE9fGh1Jk2Lm3No4Pq5Rs6Tu7Vw8 OPENAI_ORG_ID=org-9fK2mQ7vR1x",
])
def test_a_stream_says_what_the_whole_text_says_around_a_long_value(text: str) -> None:
    """A value longer than is held is redacted from its start and the rest dropped as it
    comes: up to where the whole text's value ends, not past it (the field after it, the
    closing tag, the escaped quote), nor short of it (an escaped quote inside it, a value
    starting "i" read as the start of "is")."""
    whole, _ = redact_in_pieces(text, None)
    for size in (1, 4, 7, len(text)):
        redactor = StreamRedactor(list(OUTPUT_RULES), 16384)
        streamed = "".join(redactor.feed(text[i:i + size]) for i in range(0, len(text), size))
        assert streamed + redactor.flush() == whole, size
    assert "aB3dE5fG7h" not in whole and "Tail9Secret" not in whole


def test_prose_about_credentials_is_held_back_a_word_at_most() -> None:
    """(A credential's name is held until what follows says it is given no value.)"""
    redactor = StreamRedactor(list(OUTPUT_RULES), 16384)
    prose = "Each token counts, so pick a strong password for every user and keep it secret ."
    fed = out = ""
    for word in prose.split():
        fed += word + " "
        out += redactor.feed(word + " ")
        assert fed.startswith(out) and len(fed[len(out):].split()) <= 2, (fed, out)
    assert out + redactor.flush() == prose + " "
    assert StreamRedactor(list(OUTPUT_RULES), 16384).feed("a password manager ") == \
        "a password manager "


@pytest.mark.parametrize("text", [
    "password = args.password", "token: string", 'eos_token: "</s>"', "max_token: 512",
    "PWD=/home/me/src", "bypass=abc123", "POSTGRES_PASSWORD=postgres",
    "password: ${DB_PASSWORD}", 'secret_key = os.environ["SECRET_KEY"]',
    "SECRET_KEY=your-secret-key-here", "ANTHROPIC_API_KEY=sk-ant-api03-your-key-here",
    "aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",  # (AWS's example)
    "entity_mask2_token=entity_mask2_token,", 'CHALLENGE_PASSWORD: "challengePassword",',
    '"password": "string?",', "smtp://apikey:YOUR_SENDGRID_API_KEY2@smtp.sendgrid.net:587",
    "           password changes.", "the password is wrong", "Password manager: 1Password 8",
    'publicKeyToken="30ad4fe6b2a6aeed"', "MasterUserPassword: !Ref DBPassword",
    'url = "jdbc:mysql://db?user=app&password=" + dbPw + "&useSSL=false"',
    '"password=%s&user=%s" % (pw, user)', "OPENAI_API_KEY=sk-proj-...",
    '-e "MSSQL_SA_PASSWORD=YourStrong@Passw0rd"', "high_pass = 2000",
    "ORIG_PWD=/home/user/project", "passphrase: &#x3C;string>",
    "DB_PASSWORD=op://Production/postgres/password", 'let api_key = std::env::var("API_KEY")',
    "password: (bool, optional): Hide typed text.", 'print(f"password={password!r}")',
    'export OPENAI_API_KEY="$(pass show openai/api)"',
    "$password = $request->input('password');",
    'api_key = base64.b64decode(os.environ["API_KEY_B64"])',
    'resource "random_password" "master" {', 'message(CHECK_PASS "found")',
    "'password' => 'required|string|min:8|confirmed'", "UPDATE users SET password = @password",
    "The prompt changes from `Password:` to `New password:` when you run it.",
    "{radio:!0,checkbox:!0,file:!0,password:!0,image:!0}", "n.password=null;let r=1",
    ".btn-pass:hover{color:#0a0}", "def connect(host:str,password:str,token:str=None)->None:",
    "low_pass = 0.25", "high_pass: 80Hz", 'storePassword "android"', "Password: 8-64 characters.",
    "SECRET_KEY=change_me_123", "Pass `verbosity=0` to get a table",
    '_SENSITIVE = ("access_token", "client_secret", "device_code")',
    "password_encryption = scram-sha-256", 'proxy_url="socks5h://<username>:<password>@host"',
    "{{ lookup('password', '/dev/null length=20 chars=ascii_letters') }}",
    "1. Enter your password twice2.", 'WORKLOAD_API_KEY_PLACEHOLDER = "workload-identity-auth"',
    # (a third review's)
    "if(password==confirm2){return!0}", 'Password=${file("db_password2.txt")}',
    "secret: arn:aws:secretsmanager:us-east-1:123456789012:secret:prod/db-AbCdEf",
    "existingSecret: redis-auth-2", "vault kv get -field=password secret/myapp/db2",
    '"password": "Must be at least 8 characters"', "secret: " + "-" * 300,
])
def test_a_credentials_name_without_a_secret_is_left(text: str) -> None:
    """Code reading a secret, types, tokenizer settings, placeholders, images' defaults and
    prose (each of these was found by a first version, or in installed packages' sources).
    """
    assert [text[a:b] for a, b in BY_NAME["credential"].find(text)] == []


def test_holdback_is_bounded_by_what_a_secret_needs() -> None:
    # A bearer token is held whole (up to the longest token looked for)...
    _, held = redact_in_pieces("Authorization: Bearer " + "a" * 300 + " end", random.Random(1))
    assert 300 < held < 330
    # ... a run longer than any secret is let go ...
    _, held = redact_in_pieces("sk-" + "a" * 10000 + " end", random.Random(1))
    assert held <= 4096 + 8
    # ... and an open private-key block is held only up to max_block, then dropped to its end.
    block = "-----BEGIN PRIVATE KEY-----\n" + "QUJD\n" * 400 + "-----END PRIVATE KEY-----\nafter"
    text, held = redact_in_pieces(block, random.Random(2), max_block=512)
    assert text == "[REDACTED:private_key]\nafter"
    assert held <= 512 + 8


def test_an_unfinished_private_key_is_redacted_at_the_end() -> None:
    text, _ = redact_in_pieces(
        "here:\n-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBYp8Qm2bXg4kLqZ0vR9T3wA", None)
    assert text == "here:\n[REDACTED:private_key]"


SECRETS = (  # what must never come out of a stream, whatever surrounds it
    "sk-proj-AbCdEfGhIjKlMnOpQrStUvWxYz0123456789",
    "ghp_0123456789abcdefABCDEF0123456789abcd",
    "AKIAIOSFODNN7EXAMPLQ",
    "xoxb-1234567890-abcdefghijkl",
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dBjftJeZ4CVPmB92K27uhbUJU1p1r",
)
BEFORE = ("", " ", "\n", "_", "-", "(", '"', "'", "key=", "Authorization: Bearer ",
          "token: ", "`", "=", "x")


def test_no_secret_leaks_whatever_stands_before_it_and_however_the_stream_is_cut() -> None:
    """Secrets after every kind of neighbour, cut at random: the stream never shows one, and
    (where the neighbour lets the secret start a word) says what redacting the whole text
    at once says.
    """
    rng = random.Random(7)
    for secret in SECRETS:
        for before in BEFORE:
            text = f"Here {before}{secret} and more text after it."
            whole, _ = redact_in_pieces(text, None)
            word_start = before == "" or not (before[-1].isalnum() or before[-1] in "_-")
            if word_start:
                assert secret not in whole, (before, secret)
            for _ in range(40):
                streamed, _ = redact_in_pieces(text, rng)
                if word_start:
                    assert secret not in streamed, (before, secret, streamed)
                    assert streamed == whole, (before, secret, streamed)


ONE_LINE_KEY = ("-----BEGIN PRIVATE KEY-----\\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIB"
                "\\nAQC7VJTUt9Us8cKj\\n-----END PRIVATE KEY-----")
ENCRYPTED_KEY = ("-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\n"
                 "DEK-Info: AES-128-CBC,3F17F5316E2BAC89\n\nMIIEpAIBAAKCAQEA7sOhQm9ndXNLZXlN\n"
                 "YXRlcmlhbEZvclRlc3RpbmcxMjM0NTY3\n-----END RSA PRIVATE KEY-----")


@pytest.mark.parametrize(("text", "secret"), [
    # a key in a JSON string (as in a tool call's arguments), and pasted on one line
    ('{"key": "' + ONE_LINE_KEY + '"}', "MIIEvQIBADANBgkq"),
    ("x " + ONE_LINE_KEY.replace("\\n", " ") + " y", "MIIEvQIBADANBgkq"),
    # an encrypted key, whose header lines are not base64
    ("Here:\n" + ENCRYPTED_KEY + "\nDone.", "MIIEpAIBAAKCAQEA"),
    # letters whose lower case is longer than they are, before a key and a password
    ("export KEY_" + "İ" * 10 + "=sk-proj-Abcdefghijklmnopqrstuvwx1234 ok", "Abcdefghijklmnop"),
    ("DSN=" + "İ" * 12 + "postgres://admin:Hunter2Secret@db/app ok", "Hunter2Secret"),
    # a JWT longer than the run held back (large identity tokens are)
    ("token: eyJhbGciOiJSUzI1NiJ9.eyJ" + "a" * 4800 + ".c2lnbmF0dXJlc2lnbmF0dXJl end",
     "c2lnbmF0dXJl"),
    # a bearer token in capitals
    ("AUTHORIZATION: BEARER abcdefghijklmnop0123456789 ok", "abcdefghijklmnop"),
    # npm, SendGrid, Google OAuth and Slack webhook tokens (each was missed, asked and answered)
    ("//registry.npmjs.org/:_authToken=npm_aB3dE5fG7hJ9kL1mN3pQ5rS7tU9vW1xY3z5A ok",
     "aB3dE5fG7hJ9kL1m"),
    ("SENDGRID_API_KEY=SG.aBcDeFgHiJkLmNoPqRsTuV.aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789aBcDeFg ok",
     "aBcDeFgHiJkLmNoPqRsTuV"),
    ("Authorization: OAuth ya29.a0AfH6SMBx3kLmNo9PqRsT_uVwXyZ ok", "a0AfH6SMBx3kLmNo"),
    ("curl -X POST https://hooks.slack.com/services/T0123ABCD/B0456EFGH/abcdefghijklmnopqrstuvwx"
     " -d x", "abcdefghijklmnopqrstuvwx"),
    # credentials given a value by name (each was passed on: no prefix says what they are)
    ("DB_HOST=db\nDB_PASSWORD=Tr0ub4dor&3xK!92\nDB_NAME=orders", "Tr0ub4dor"),
    ("[prod]\naws_secret_access_key = 9fK2mQ7vR1xT8bN4cW6zL0pH3sJ5dY2gE7uA1iO4\nregion = x",
     "9fK2mQ7vR1xT8bN4"),
    ('{"endpoint": "https://x.io", "apiKey": "b7f3e9a1c4d82f6e0a5b9c3d7e1f4a28", "n": 1}',
     "b7f3e9a1c4d82f6e"),
    ('password = "correct horse battery staple" # ok', "horse battery"),
    ("The staging admin password is Stg#Adm1n!2024q and that is all.", "Adm1n"),
    ("bind 0.0.0.0\nrequirepass Rd!s_Cl4ster9\nport 6379", "Cl4ster9"),
    ('{"dsn": "postgres://app:s3cr\\"et9Qx@db/x"}', "et9Qx"),  # (a quote escaped in JSON)
    # (each was missed, or cut short, by a first version)
    ('{"path": ".env", "content": "DB_PASSWORD=\\"Tr0ub4dor&3xK!92\\"\\n"}', "Tr0ub4dor"),
    ("Set `DB_PASSWORD=Tr0ub4dor(3xK)!92` in your .env", "3xK"),
    ("DB_PASSWORD=Tr0ub4dor;3xK!92 ok", "3xK!92"), ("'password' => 'Sup3rS3cr3t!x'", "S3cr"),
    ('password := "Sup3rS3cr3t!x"', "S3cr"), ("PGPASSWORD=Sup3rS3cr3t9 psql", "S3cr"),
    ("requirepass          Rd!s_Cl4ster9\n", "Cl4ster9"),
    ('{"notes":"' + "a" * 3990 + '","password":"Tr0ub4dor&3xK!92Qz","more":"' + "b" * 200 + '"}',
     "Tr0ub4dor"),  # (past the longest run held: one was let go between name and value)
    # (a second review's: a key's marker inside a value, a name inside one, flags, long
    # tokens, XML, PHP, ODBC, a string's prefix, random passwords)
    ('{"apiKey": "eyJrIjoiT0tTcG1pUlY2RnVKZTFVaDFsNFZXdDA3OUJ1ZUZ6cWgiLCJuIjoiYWRtaW4ifQ=="}',
     "T0tTcG1pUlY2"),
    ('{"client_secret":"q8W3eyJf0bX2kL9mN4pR7sT1","grant_type":"client_credentials"}',
     "0bX2kL9m"),
    ("requirepass 9Xy_pass_Qz \n", "9Xy_pass"),
    ("docker login r.example.com --username deploy --password xK9mP2qL7vR\n", "xK9mP2q"),
    ("aws_session_token = IQoJb3JpZ2luX2VjEJr" + "A1b2C3d4E5f6G7h8" * 36 + "\nregion = x",
     "E5f6G7h8A1b2"),
    ("<password>xK9#mP2qL7vR</password>", "mP2qL7"), ("define( 'DB_PASSWORD', 'xK9#mP2qL7vR' );",
                                                      "mP2qL7"),
    ("pass: 'xK9#mP2qL7vR'", "mP2qL7"), ("Uid=app;Pwd=xK9#mP2qL7vR;Db=x", "mP2qL7"),
    ("SECRET_KEY_BASE=9f8e7d6c5b4a39281706f5e4d3c2b1a0 ok", "5b4a3928"),
    ('password = f"Xk9#mP2qL7vR"', "mP2qL7"), ("DB_PASSWORD=vBQAfV!@fXc%dJgSwxg2 ok", "fXc%dJ"),
    ('{"password": "J6JT}]6A<P!=xu@gj|XY"}', "xu@gj"),
    ("aws_secret_access_key = /k3JdXq9pL7mN2bV5cX8zQ1wE4rT6yU0iO3pA9sD\n", "pL7mN2bV"),
])
def test_secrets_of_every_shape_are_redacted_however_the_stream_is_cut(text: str,
                                                                       secret: str) -> None:
    whole, _ = redact_in_pieces(text, None)
    assert secret not in whole and "[REDACTED:" in whole
    for seed in range(30):
        streamed, _ = redact_in_pieces(text, random.Random(seed))
        assert secret not in streamed, (seed, streamed)
    for cut in range(1, len(text), max(1, len(text) // 200)):  # in two pieces
        halves = StreamRedactor(list(OUTPUT_RULES), 16384)
        streamed = halves.feed(text[:cut]) + halves.feed(text[cut:]) + halves.flush()
        assert secret not in streamed, (cut, streamed)
    one_by_one = StreamRedactor(list(OUTPUT_RULES), 16384)
    assert secret not in "".join(one_by_one.feed(c) for c in text) + one_by_one.flush()


JWT = ("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2"
       "MjM5MDIyfQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c")
LONG_URL = "see https://x.io/cb?s=" + "b" * 4100 + "&t="


@pytest.mark.parametrize("chunks", [
    ["Authorization: Bearer", " " * 60, "abcdefghijklmnop0123456789abcdef end"],
    ["x sk-abcdefghij-----BEGIN", " x"],  # a key cut short by what looks like a PEM header
    [LONG_URL + JWT[:72], JWT[72:] + " end"],  # a token after a run longer than is held
    [LONG_URL + JWT[:90], JWT[90:] + " end"],
    [LONG_URL + "postgres://admin:", "Pa55w0rdPa55w0rd@db:5432 end"],
], ids=["bearer-spaces", "header-after-key", "jwt-72", "jwt-90", "url-password"])
def test_unlucky_cuts_show_what_the_whole_text_shows(chunks: list[str]) -> None:
    whole, _ = redact_in_pieces("".join(chunks), None)
    redactor = StreamRedactor(list(OUTPUT_RULES), 16384)
    streamed = "".join(redactor.feed(chunk) for chunk in chunks) + redactor.flush()
    assert streamed == whole and "[REDACTED:" in whole


def test_what_a_stream_holds_costs_time_in_proportion_to_it() -> None:
    """Long held text in small pieces: a bearer token of 40 KB, a private key of 16 KB, a
    key header followed by 17,000 spaces. Each is read in well under a second, and redacted.
    """
    key = "-----BEGIN PRIVATE KEY-----\n" + "QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo=\n" * 420 + \
        "-----END PRIVATE KEY-----\nafter"
    for text, expected in (
            ("Bearer " + "QWxhZGRpbjpvcGVu" * 2560 + " ok", "[REDACTED:bearer_token] ok"),
            (key, "[REDACTED:private_key]\nafter"),
            ("-----BEGIN RSA PRIVATE KEY-----" + " " * 17000 + "\nafter", None),
            ("intro -----BEGIN" + " AB" * 4000, None),  # a header that never ends
            ("password:" * 2000, None),  # a credential's name again and again
            ("-----BEGIN PRIVATE KEY-----\n" + "QUJDREVGR0hJSktMTU5PUFFSU1RV\n" * 600
             + " " * 20000, None)):  # a key past max_block, then a line of spaces
        redactor = StreamRedactor(list(OUTPUT_RULES), 16384)
        started = time.perf_counter()
        out = "".join(redactor.feed(text[i:i + 4]) for i in range(0, len(text), 4))
        out += redactor.flush()
        assert time.perf_counter() - started < 1.0, text[:20]
        if expected is not None:
            assert out == expected


def test_the_rules_edges() -> None:
    api_key, bearer, url = BY_NAME["api_key"], BY_NAME["bearer_token"], BY_NAME["url_password"]
    assert api_key.find("id AKIAIOSFODNN7EXAMPLQ-prod") != []  # a key before a hyphen
    assert api_key.find("mask-" + "a" * 30) == []  # inside a word: not a key
    assert bearer.find("BEARER abcdefghijklmnop0123") != []
    assert url.find("postgres://bob:yourself2024@db/app") != []  # not a placeholder
    for placeholder in ("your_password", "yourpassword", "<password>", "${DB_PASS}", "xxxx"):
        assert url.find(f"postgres://bob:{placeholder}@db/app") == [], placeholder
    # The images' and tutorials' own defaults: a compose file redacted would not work.
    for example in ("postgresql://postgres:postgres@db:5432/app", "amqp://guest:guest@mq//",
                    "mongodb://root:example@mongo:27017/", "redis://default:redis@cache",
                    "postgres://app:app@localhost/app"):
        assert url.find(example) == [], example
    assert url.find("postgres://app:app-S3cr3t-2024@localhost/app") != []


def test_a_text_about_pem_files_is_not_redacted() -> None:
    for text in ("A key file starts with -----BEGIN PRIVATE KEY----- and you keep it secret.",
                 "Look for the line\n-----BEGIN RSA PRIVATE KEY-----\nand what follows it."):
        assert redact_in_pieces(text, None)[0] == text
        assert redact_in_pieces(text, random.Random(3))[0] == text


def test_an_address_in_a_code_comment_is_not_personal_data() -> None:
    email = BY_NAME["email"]
    for text in ("Why?\n\nfunction f() {\n            // TODO(k.oduya@hey.com): drop it\n}",
                 "Look:\n# maintainer: k.oduya@hey.com\nimport os",
                 "```\nsend(to='k.oduya@hey.com')\n```"):
        assert email.find(text) == [], text
    for text in ("Write to k.oduya@hey.com about it", "Why?\n  k.oduya@hey.com // not code"):
        assert email.find(text) != [], text


ADVERSARIAL = (  # inputs that make careless patterns backtrack; 64 KB each
    "a" * 65536, " " * 65536, "\n" * 65536, "1" * 65536, "1 " * 32768, "1-" * 32768,
    "@" * 65536, "a@" * 32768, "a.a@" * 16384, "x" * 65000 + "@example.org",
    "sk-" * 21845, "Bearer " * 9362, "://" * 21845, "a:b@" * 16384, "eyJ." * 16384,
    "-----BEGIN PRIVATE KEY-----\n" * 2340, "-----BEGIN PRIVATE KEY-----\n" + "A" * 65000,
    "-----BEGIN PRIVATE KEY----- " + "A " * 32000, "```" * 21845, "SYSTEM: " * 8192,
    "ignore " * 9362, "\t" * 65536 + "system:", "GB82" * 16384, "+1 (" * 16384,
    "@ " + "a%" * 32767, "eyJ-" * 16384, "-----BEGIN PRIVATE KEY----- x " * 2048,
    "grandma would " * 4681, "DAN " * 16384, "://a:" * 13107,
    "-----BEGIN PRIVATE KEY-----" + "\\nQUJD" * 10000 + "!",  # a JSON-escaped key, cut
    "-----BEGIN PRIVATE KEY-----\n" + " " * 65000 + "!",
    "password=" * 7281, "password:" * 7281, "secret_access_" * 4681, "password: 'x\\" * 5000,
    "password x1 " * 5461, "password is " * 5461, "bypass" * 10922,
)


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: rule.name)
def test_no_rule_is_slow_on_adversarial_input(rule: Rule) -> None:
    """Every rule reads 64 KB of its worst known input in well under the time a request has
    (linear patterns take milliseconds; a backtracking one would take minutes).
    """
    for text in ADVERSARIAL:
        started = time.perf_counter()
        rule.find(text)
        assert time.perf_counter() - started < 2.0, (rule.name, text[:20])


def test_a_credentials_directive_is_read_in_linear_time() -> None:
    """(Each candidate copied its line's start: 1 MB of them on one line took 4 s.)"""
    for n in (21_845, 87_381):  # 256 KB and 1 MB
        started = time.perf_counter()
        BY_NAME["credential"].find("password x1 " * n)
        took = time.perf_counter() - started
        if n == 21_845:
            small = took
    assert took < 8 * small + 0.2, (small, took)


def test_number_checks() -> None:
    assert luhn("4111111111111111") and not luhn("4111111111111112")
    assert iban_valid("GB82 WEST 1234 5698 7654 32") and not iban_valid("GB83WEST12345698765432")
    assert not iban_valid("XX82WEST12345698765432")


@pytest.mark.parametrize(("text", "loops"), [
    ("I will check the logs. " * 30, True),
    ("ha" * 200, True),
    ("Some answer first. " + "| a | b |\n" * 40, True),
    ("A normal answer that explains a thing in a few sentences. " * 1, False),
    ("Step 1: open the file. Step 2: read it. Step 3: close it. Step 4: report.", False),
    (" ".join(f"item {i}" for i in range(100)), False),
])
def test_repetition_loops(text: str, loops: bool) -> None:
    assert looping(text, 120) is loops


SCHEMA = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
    "type": "object", "required": ["name", "tags"], "additionalProperties": False,
    "properties": {"name": {"type": "string"}, "tags": {"type": "array", "items": {
        "type": "string"}}, "size": {"enum": ["s", "m"]}, "n": {"type": "integer"}}}}}


@pytest.mark.parametrize(("text", "problem"), [
    ('{"name": "a", "tags": ["x"]}', None),
    ('{"name": "a", "tags": ["x"], "size": "m", "n": 3}', None),
    ('{"name": "a"', "not valid JSON"),
    ('```json\n{"name": "a", "tags": []}\n```', "not valid JSON"),
    ('{"name": "a"}', "$.tags is missing"),
    ('{"name": 1, "tags": []}', "$.name is not of type string"),
    ('{"name": "a", "tags": [1]}', "$.tags[0] is not of type string"),
    ('{"name": "a", "tags": [], "size": "xl"}', "$.size is not one of the allowed values"),
    ('{"name": "a", "tags": [], "n": true}', "$.n is not of type integer"),
    ('{"name": "a", "tags": [], "n": 3.0}', None),  # (JSON Schema's integers: no fraction)
    ('{"name": "a", "tags": [], "n": 3.5}', "$.n is not of type integer"),
    ('{"name": "a", "tags": [], "extra": 1}', "$.extra is not allowed"),
    ('[1, 2]', "$ is not of type object"),
])
def test_json_schema_checks(text: str, problem: str | None) -> None:
    assert json_problem(text, SCHEMA) == problem


@pytest.mark.parametrize(("text", "problem"), [
    ('{"city": "Oslo"}', None),
    ('{"city": 1}', "$.city is not of type string"),
    ('{"size": "xl"}', None),
    ("{}", None),
])
def test_schema_keywords_of_another_shape_are_let_be(text: str, problem: str | None) -> None:
    """Draft 3's ``"required": true``, an ``enum`` that is not a list, ``properties`` that
    are not an object: not checked, where they failed the answered request with a 500.
    """
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "required": True, "properties": {
            "city": {"type": "string", "required": True},
            "size": {"enum": "s", "properties": ["a"]}}}}}
    assert json_problem(text, fmt) == problem


def test_json_object_checks() -> None:
    fmt = {"type": "json_object"}
    assert json_problem('{"a": 1}', fmt) is None
    assert json_problem("[1]", fmt) == "not a JSON object"
    assert json_problem("{'a': 1}", fmt) == "not valid JSON"


def redacted_stream(chunks: list[Chunk]) -> list[Chunk]:
    """What the safety plugin lets through of a stream of ``chunks``."""
    async def feed() -> AsyncIterator[Chunk]:
        for chunk in chunks:
            yield chunk

    async def read() -> list[Chunk]:
        plugin = SafetyPlugin(SafetyOptions())
        return [chunk async for chunk in plugin.on_stream(None, feed())]  # type: ignore[arg-type]

    return asyncio.run(read())


def kinds(chunks: list[Chunk]) -> list[str]:
    """The channels of a stream in the order they come, each once per run."""
    out: list[str] = []
    for chunk in chunks:
        for kind, there in (("reasoning", chunk.reasoning), ("text", chunk.content),
                            ("tool call", chunk.tool_calls)):
            if there and (not out or out[-1] != kind):
                out.append(kind)
    return out


def test_each_channel_of_a_redacted_stream_comes_whole_before_the_next() -> None:
    """The end of the reasoning ("date": its "e" may begin a token) and of the text before a
    tool call ("please") were held back until the finish, and came after what followed
    them: the Responses and Anthropic doors then made an item or block of each piece.
    """
    call = {"index": 0, "id": "call_1", "type": "function",
            "function": {"name": "look", "arguments": '{"q": 1}'}}
    out = redacted_stream([
        Chunk(reasoning="Checking the "), Chunk(reasoning="date"),
        Chunk(content="It is Monday. Look it up, "), Chunk(content="please"),
        Chunk(tool_calls=[call]), Chunk(finish_reason="tool_calls")])
    assert kinds(out) == ["reasoning", "text", "tool call"]
    assert "".join(c.reasoning for c in out) == "Checking the date"
    assert "".join(c.content for c in out) == "It is Monday. Look it up, please"


def test_the_log_probabilities_of_text_held_back_go_out_with_the_next_chunk() -> None:
    def logprob(token: str) -> dict[str, Any]:
        return {"content": [{"token": token, "logprob": -0.5, "bytes": None,
                             "top_logprobs": []}]}

    tokens = ["The", " password", ":", " none", "."]  # (":" is held back whole)
    out = redacted_stream([Chunk(content=t, logprobs=logprob(t)) for t in tokens]
                          + [Chunk(finish_reason="stop")])
    got = [entry["token"] for c in out if c.logprobs for entry in c.logprobs["content"]]
    assert got == tokens
    assert "".join(c.content for c in out) == "The password: none."

    # Those of a secret redacted never go out: they would spell it.
    tokens = ["Your", " key", " is", " sk", "-proj", "-", "Ab3dEf9hIj", "Kl2mNoPq", "Rs7tUvWx",
              "Yz01", " ok", "."]
    out = redacted_stream([Chunk(content=t, logprobs=logprob(t)) for t in tokens]
                          + [Chunk(finish_reason="stop")])
    assert "".join(c.content for c in out) == "Your key is [REDACTED:api_key] ok."
    spelled = "".join(e["token"] for c in out if c.logprobs for e in c.logprobs["content"])
    assert spelled.startswith("Your key is") and "sk" not in spelled and "Ab3d" not in spelled

    # ... nor of one in the reasoning (servers that give those of the reasoning too).
    out = redacted_stream([Chunk(reasoning=t, logprobs=logprob(t)) for t in tokens]
                          + [Chunk(content="Done", logprobs=logprob("Done")),
                             Chunk(finish_reason="stop")])
    assert "".join(c.reasoning for c in out) == "Your key is [REDACTED:api_key] ok."
    spelled = "".join(e["token"] for c in out if c.logprobs for e in c.logprobs["content"])
    assert "sk" not in spelled and "Ab3d" not in spelled


def _judged(reply: str, system: str | None = None, *, finish: str = "stop",
            max_tokens: int | None = None) -> list[str]:
    messages = [*([{"role": "system", "content": system}] if system else []),
                {"role": "user", "content": "Help me, please."}]
    body: dict[str, Any] = {"model": "m", "messages": messages}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    ctx = RequestContext(kind="chat", req=parse_chat(body), tenant="", client_headers={})
    return list(QualityPlugin(QualityOptions()).judge(
        ctx, Completion(content=reply, finish_reason=finish)))


@pytest.mark.parametrize(("reply", "refused"), [
    ("I'm sorry, but I can't help with that.", True),
    ("I cannot provide instructions for that.", True),
    ("As an AI language model, I cannot create that content.", True),
    ("I'm unable to help with that.", True),
    ("I can't.", True),
    # (a refusal that offers something else is one all the same)
    ("I can't help with that request, but I'd be happy to help with something else.", True),
    ("I cannot assist with that, but here are some general tips.", True),
    ("I\u2019m sorry, but I can\u2019t assist with that request.", True),
    ("I cannot and will not provide instructions for making weapons.", True),
    ("I must decline this request.", True),
    ("I apologize, but I cannot fulfill this request.", True),
    ("As an AI language model, I cannot browse the internet.", True),
    ("I'm sorry, but I won't be able to help with that.", True),
    ("No, I can't help with that.", True),
    ("I'm sorry, but that's not something I can help with.", True),
    ("I cannot give medical advice, but ibuprofen's usual dose is 200 mg.", False),
    ("I can't answer that without more context: which version of Python?", False),
    ("I can't write to that directory, so I saved the file in /tmp instead.", False),
    # (what the model could not find, an idiom, a hedge that goes on: answers, each taken to
    # a stronger model, and paid twice)
    ("Sorry, I can't find any bug in this function: it correctly returns the sum.", False),
    ("Unfortunately, I can't reproduce this without the traceback. Could you paste it?", False),
    ("I can't help but point out that floating point is inexact.", False),
    ("As an AI, I don't have personal preferences, but vim is popular.", False),
    ("I can't answer that with certainty, but forecasts show 60% rain.", False),
    # (the hedge a sentence, the answer the next)
    ("I can't create files on your machine. Save this as hello.py:\n\n```python\n"
     "print('hello')\n```", False),
    ("I cannot provide real-time data. As of my last update, Paris had 2.1 million people.",
     False),
    ("I'm sorry, I can't see your screen. From the error, run `pip install requests`.", False),
    ("I can't run code, so I haven't tested this. Here is the function:\n\n"
     "def add(a, b):\n    return a + b", False),
    ("I can't help with that. If you have another question, I'd be happy to help.", True),
    ("I cannot assist with creating malware. Writing it is illegal and harmful.", True),
    # (a refusal's numbers and words in backticks: no answer)
    ("I can't help with that. If you are in crisis, please call or text 988.", True),
    ("I cannot assist with creating malware. It violates section 2 of the usage policy.",
     True),
    ("I cannot help with that request. Please see the `safety` guidelines.", True),
    ("I won't write that. It's illegal in all 50 states.", True),
])
def test_a_refusal_is_one_and_an_answer_that_opens_with_an_apology_is_not(
        reply: str, refused: bool) -> None:
    assert ("refusal" in _judged(reply)) is refused


def test_an_answer_that_spent_the_clients_limit_before_its_text_is_not_empty() -> None:
    """A reasoning model that spent ``max_tokens`` on its reasoning: the client's limit, not a
    poor answer (it was taken to a stronger model, the cloud's)."""
    assert _judged("", finish="length", max_tokens=3) == []
    assert _judged("", finish="stop") == ["empty"]


@pytest.mark.parametrize(("text", "found"), [
    ('{"base_url":"http://localhost:11434","owner":"bob@corp.io"}', []),
    ("curl http://localhost:8080?next=me@x.io fails", []),
    ("DATABASE_URL=postgresql://app:hunter2@db:5432/app", ["hunter2"]),
])
def test_a_url_password_ends_where_the_url_part_or_the_json_string_does(
        text: str, found: list[str]) -> None:
    """(It ran on over a port, a JSON string's end and the next field, up to someone's
    address: the field was cut out of the answer.)"""
    rule = BY_NAME["url_password"]
    assert [text[a:b] for a, b in rule.find(text)] == found


@pytest.mark.parametrize("text", [
    "ANTHROPIC_API_KEY=sk-ant-api03-your-key-here",  # (digits in the prefix: not its own)
    "aws_access_key_id = AKIAI44QH8DHBEXAMPLE",  # (AWS's second documented example)
    "We support Bearer authentication/authorization.",
    "export OPENAI_API_KEY=sk-your-api-key-goes-here-xxxx",
    "key = 'sk-xxxxxxxxxxxxxxxxxxxxxxxxxxxx'",
    "Why does `aws configure` reject AKIAIOSFODNN7EXAMPLE?",  # (AWS's documented example)
    "Explain bearer authentication/authorization flows vs cookies",
    # (nor an essay's words a jailbreak's prompts use too)
    "Researchers hope future systems will be freed from the limitations of AI as we know it.",
])
def test_placeholders_and_prose_are_not_secrets(text: str) -> None:
    """(Each was redacted: a README's placeholder, AWS's own example, prose about Bearer.)"""
    assert [rule.name for rule in RULES if list(rule.find(Text(text)))] == []


@pytest.mark.parametrize("dsn", ["postgres://app:Tr0ub4dor,3@db:5432/app",
                                 "redis://default:Kp2,Lm9,Qr4@cache:6379",
                                 "postgres://app:it'sAs3cret@db/app",
                                 "mysql://root:S3cr3t#Pw@db/x"])
def test_a_url_password_with_any_of_its_characters_is_found(dsn: str) -> None:
    """(Commas, quotes and # are a password's too: a first fix for JSON let them through.)"""
    assert [dsn[a:b] for a, b in BY_NAME["url_password"].find(dsn)] == \
        [dsn.split("//")[1].split("@")[0].split(":", 1)[1]]


@pytest.mark.parametrize("text", [
    "sk-proj-Ab3dEf9hIjKlMnOpQrStUv-example-Xy7z0123456789",
    "sk-proj-Ab3dEf9hIjKlMnOpQrStUvWxYz0123456789-here",
    "sk-proj-xxxxxxAb3dEf9hIjKlMnOpQrStUvWxYz0123456789",
    "Authorization: Bearer abcdefghijklmnopqrstuvwx",
    "Authorization: Bearer ZkFbQwErTyUiOpAsDfGhJkLz/QwErTyUiOp",
    "mysql://root:1?Qz9!x@db.internal:3306/shop",  # (a password that starts like a port)
])
def test_a_real_secret_dressed_as_a_placeholder_is_still_one(text: str) -> None:
    """(A first version of the placeholder exceptions let these through: a model asked to
    add "-example" to a key it was given would have passed it out.)"""
    assert [rule.name for rule in RULES if list(rule.find(Text(text)))]


@pytest.mark.parametrize(("arguments", "sent"), [
    ('{"pan": 4111111111111111, "note": "use sk-proj-Q3xv9TzL0mW8rB2nY7kJ4hC6pF1sD5 now"}',
     {"pan": "[REDACTED:card]", "note": "use [REDACTED:api_key] now"}),
    (' [4111111111111111, "x"]', ["[REDACTED:card]", "x"]),
    ('{"amount": 4111111111111111.5}', {"amount": 4111111111111111.5}),  # (no card: a float)
])
def test_redacted_json_stays_json(arguments: str, sent: Any) -> None:
    """(A number redacted beside a redaction in a string, JSON after white space, and a
    float were left invalid JSON by the first mend.)"""
    plugin = SafetyPlugin(SafetyOptions())
    body = {"model": "m", "messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}]},
        {"role": "user", "content": "go on"}]}
    ctx = RequestContext(kind="chat", req=parse_chat(body), tenant="", client_headers={})
    asyncio.run(plugin.on_request(ctx))
    assert json.loads(ctx.req.messages[0]["tool_calls"][0]["function"]["arguments"]) == sent


def test_a_credential_rule_turned_off_holds_and_redacts_nothing() -> None:
    """(`credential = "off"` still held names and redacted long values in streams.)"""
    rules = [rule for rule in OUTPUT_RULES if rule.name != "credential"]
    text = "DB_PASSWORD=" + V + " and the password is Stg#Adm1n!2024q."
    for size in (1, 20):
        redactor = StreamRedactor(rules, 16384)
        out = []
        for i in range(0, len(text), size):
            out.append(redactor.feed(text[i:i + size]))
            assert len(redactor.pending) < 8, i  # (a key's prefix at most, not a value)
        assert "".join(out) + redactor.flush() == text
