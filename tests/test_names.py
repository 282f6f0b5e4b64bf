"""Tests for sandbox name and in-sandbox path validation."""

from __future__ import annotations

import pytest

from agentkernel.errors import UsageError
from agentkernel.names import sanitize_sandbox_name, validate_sandbox_name, validate_sandbox_path

GOOD_NAMES = ["a", "A1", "my-box", "my_box", "a-b_c-d", "x" * 63, "0", "Test-123"]


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_good_names(name: str) -> None:
    assert validate_sandbox_name(name) == name


BAD_NAMES = [
    ("", "empty"),
    ("x" * 64, "max 63"),
    ("../../x", "letters"),
    ("a/b", "letters"),
    ("a.b", "letters"),
    ("a b", "letters"),
    ("a\x00b", "letters"),
    ("a\nb", "letters"),
    ("box\n", "letters"),
    ("café", "letters"),
    ("\uff41\uff42\uff43", "letters"),  # fullwidth "abc": alphanumeric to str.isalnum()
    ("١٢٣", "letters"),  # Arabic-Indic digits, likewise
    ("a--b", "'--'"),
    ("a__b", "'--'"),
    ("a-_b", "'--'"),
    ("a_-b", "'--'"),
    ("-a", "start and end"),
    ("a-", "start and end"),
    ("_a", "start and end"),
    ("a_", "start and end"),
    ("$(id)", "letters"),
]


@pytest.mark.parametrize(("name", "why"), BAD_NAMES)
def test_bad_names(name: str, why: str) -> None:
    with pytest.raises(UsageError) as info:
        validate_sandbox_name(name)
    assert why in info.value.message
    assert "\n" not in info.value.message and "\x00" not in info.value.message


def test_non_string_name() -> None:
    with pytest.raises(UsageError):
        validate_sandbox_name(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("my-project", "my-project"),
        ("My Project", "My-Project"),
        ("a__b..c", "a-b-c"),
        ("---", "sandbox"),
        ("", "sandbox"),
        ("日本", "sandbox"),
        ("x" * 100, "x" * 63),
    ],
)
def test_sanitize(text: str, expected: str) -> None:
    name = sanitize_sandbox_name(text)
    assert name == expected
    assert validate_sandbox_name(name) == name


def test_sanitize_truncation_never_ends_in_separator() -> None:
    name = sanitize_sandbox_name("a" * 62 + " b")
    assert validate_sandbox_name(name) == "a" * 62


@pytest.mark.parametrize(
    ("path", "normal"),
    [
        ("/", "/"),
        ("/tmp/x", "/tmp/x"),
        ("/tmp/a..b", "/tmp/a..b"),
        ("/tmp/..x/y..", "/tmp/..x/y.."),
        ("/tmp/...", "/tmp/..."),
        ("//tmp///x", "/tmp/x"),
        ("/tmp/./x/.", "/tmp/x"),
        ("/workspace/dir/", "/workspace/dir"),
        ("/tmp/café 1", "/tmp/café 1"),
        ("/" + "a" * 4095, "/" + "a" * 4095),
    ],
)
def test_good_paths(path: str, normal: str) -> None:
    assert validate_sandbox_path(path) == normal


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("", "absolute"),
        ("tmp/x", "absolute"),
        ("./x", "absolute"),
        ("../../x", "absolute"),
        ("/../../x", "'..'"),
        ("/tmp/../etc/shadow", "'..'"),
        ("/..", "'..'"),
        ("/tmp/x/..", "'..'"),
        ("/tmp//../x", "'..'"),
        ("/tmp/x\x00y", "NUL"),
        ("/" + "a" * 4096, "bytes"),
        ("/" + "é" * 2048, "bytes"),  # 4097 bytes though only 2049 characters
        ("/tmp/\udcff", "UTF-8"),
    ],
)
def test_bad_paths(path: str, why: str) -> None:
    with pytest.raises(UsageError) as info:
        validate_sandbox_path(path)
    assert why in info.value.message
    assert "\x00" not in info.value.message


def test_hand_check_matches_the_name_grammar() -> None:
    """The hot path's hand-written check accepts exactly `[A-Za-z0-9]+([-_][A-Za-z0-9]+)*`."""
    import random
    import re

    from agentkernel.names import _is_name

    rng = random.Random(7)
    alphabet = "aZ09-_.é /"
    for _ in range(20000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))
        expected = re.fullmatch(r"[A-Za-z0-9]+(?:[-_][A-Za-z0-9]+)*", s, re.ASCII) is not None
        assert _is_name(s) == expected, s
