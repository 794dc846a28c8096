"""The tokens file and who a token stands for (engine.service.users)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.config import ConfigError
from engine.service.users import Users, parse_tokens


def test_users_come_from_the_file_and_the_single_token_is_default(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("# who may send\nalice  tok-a  # laptop\n\nbob tok-b\nalice tok-a2\n")
    users = Users("tok-default", str(path))
    assert users.required and users.names == ["alice", "bob", "default"]
    assert [users.authenticate(t) for t in ("tok-a", "tok-a2", "tok-b", "tok-default")] == [
        "alice",
        "alice",
        "bob",
        "default",
    ]
    assert users.authenticate("nope") is None and users.authenticate("") is None


def test_without_tokens_everyone_is_the_unnamed_user() -> None:
    users = Users()
    assert not users.required and users.authenticate("anything") == ""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("alice tok\nbob\n", "line 2: expected 'USER TOKEN' (two fields), got 1 fields"),
        ("alice tok extra\n", "line 1: expected 'USER TOKEN' (two fields), got 3 fields"),
        ("alice tok\nbob tok\n", "line 2: this token already belongs to user 'alice' (line 1)"),
        ("al/ice tok\n", "line 1: user 'al/ice' must be 1-64 letters"),
        ("# nothing\n\n", "no 'USER TOKEN' line"),
    ],
)
def test_a_bad_file_is_refused_naming_the_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match="src") as info:
        parse_tokens(text, "src")
    assert message in str(info.value)


def test_a_reload_with_a_bad_file_keeps_the_tokens_in_force(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("alice tok-a\n")
    users = Users("", str(path))
    generation = users.generation
    path.write_text("bob tok-b\n")
    assert users.reload() == 1 and users.authenticate("tok-b") == "bob"
    assert users.authenticate("tok-a") is None and users.generation == generation + 1
    path.write_text("broken\n")
    with pytest.raises(ConfigError, match=r"ENGINE_AUTH_TOKENS_FILE=.* line 1"):
        users.reload()
    assert users.authenticate("tok-b") == "bob"


def test_the_single_token_may_not_be_another_users(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("alice same\n")
    with pytest.raises(ConfigError, match="ENGINE_AUTH_TOKEN is user 'alice'"):
        Users("same", str(path))
    with pytest.raises(ConfigError, match="cannot read ENGINE_AUTH_TOKENS_FILE"):
        Users("", str(tmp_path / "missing"))
