"""The checks inside the plugins: output redaction however a stream is cut into chunks, and
how little it holds back; repetition loops; JSON and schema checks.
"""

from __future__ import annotations

import random

import pytest

from plugins.qa import json_problem, looping
from plugins.safety import StreamRedactor
from plugins.safety_rules import OUTPUT_RULES, iban_valid, luhn

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
    text, _ = redact_in_pieces("here:\n-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBY", None)
    assert text == "here:\n[REDACTED:private_key]"


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
    ('{"name": "a", "tags": [], "extra": 1}', "$.extra is not allowed"),
    ('[1, 2]', "$ is not of type object"),
])
def test_json_schema_checks(text: str, problem: str | None) -> None:
    assert json_problem(text, SCHEMA) == problem


def test_json_object_checks() -> None:
    fmt = {"type": "json_object"}
    assert json_problem('{"a": 1}', fmt) is None
    assert json_problem("[1]", fmt) == "not a JSON object"
    assert json_problem("{'a': 1}", fmt) == "not valid JSON"
