"""Who a client is: the user behind its token (binary Hello, HTTP ``Authorization: Bearer``).

``ENGINE_AUTH_TOKENS_FILE`` holds ``USER TOKEN`` pairs, one a line (blank
lines and ``#`` comments ignored; a user may have several tokens, a token
belongs to one user).  The single ``ENGINE_AUTH_TOKEN`` (or the token in
``ENGINE_AUTH_TOKEN_FILE``, which ``ps`` cannot show) keeps working as the
user ``default``.  With neither, every client is the same unnamed user ``""``
and nothing is asked.  The service stamps this user on every message a client
sends (``msg.user``) and keys the response cache, idempotent submits and rate
limits by it; a client never names its own user.

SIGHUP reloads the files; a bad file is refused with the line that is wrong
and the tokens in force stay.  Open binary connections are checked again at
their next frame, so a removed token stops working at once.  Tokens are
looked up by their SHA-256 digest, so the lookup's timing says nothing about
the tokens held.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from engine.config import Config, ConfigError, read_token_file

DEFAULT_USER = "default"  # the user of ENGINE_AUTH_TOKEN
_USER = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}")


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def parse_tokens(text: str, source: str) -> dict[bytes, str]:
    """``USER TOKEN`` lines -> {token digest: user}; ConfigError naming the first bad line."""
    users: dict[bytes, tuple[str, int]] = {}
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) > 2 and fields[2].startswith("#"):
            fields = fields[:2]  # a trailing comment
        where = f"{source} line {number}"
        if len(fields) != 2:
            raise ConfigError(
                f"{where}: expected 'USER TOKEN' (two fields), got {len(fields)} fields"
            )
        user, token = fields
        if not _USER.fullmatch(user):
            raise ConfigError(
                f"{where}: user {user!r} must be 1-64 letters, digits or _.@- "
                "(starting with a letter or digit)"
            )
        key = _digest(token)
        if key in users:
            other, first = users[key]
            raise ConfigError(
                f"{where}: this token already belongs to user {other!r} (line {first}); "
                "a token must name one user"
            )
        users[key] = (user, number)
    if not users:
        raise ConfigError(f"{source}: no 'USER TOKEN' line (an empty file would admit nobody)")
    return {key: user for key, (user, _) in users.items()}


class Users:
    """The tokens in force and the user each one stands for."""

    def __init__(self, token: str = "", path: str = "", token_file: str = "") -> None:
        self.token = token
        self.path = path
        self.token_file = token_file  # ENGINE_AUTH_TOKEN_FILE: read again by every reload
        self.generation = 0  # bumped by every reload: connections check theirs per frame
        self._users: dict[bytes, str] = {}
        self._longest = 0
        self.reload()

    @classmethod
    def from_config(cls, config: Config) -> Users:
        return cls(config.auth_token, config.auth_tokens_file, config.auth_token_file)

    @property
    def max_token_bytes(self) -> int:
        """An upper bound of the UTF-8 length of any token in force (0 without tokens):
        what a Hello must be able to carry before its connection is authenticated."""
        return self._longest

    @property
    def required(self) -> bool:
        """True when clients must show a token."""
        return bool(self._users)

    @property
    def names(self) -> list[str]:
        return sorted(set(self._users.values()))

    def reload(self) -> int:
        """Read the tokens again; raises ConfigError (the old tokens stay) if the file is bad.

        Returns how many users there are now.
        """
        users: dict[bytes, str] = {}
        longest = 0
        if self.path:
            source = f"ENGINE_AUTH_TOKENS_FILE={self.path}"
            try:
                text = Path(self.path).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"cannot read {source}: {exc}") from exc
            users = parse_tokens(text, source)
            longest = max(len(line.encode()) for line in text.splitlines())
        token = read_token_file(self.token_file) if self.token_file else self.token
        if token:
            key = _digest(token)
            if users.get(key, DEFAULT_USER) != DEFAULT_USER:
                raise ConfigError(
                    f"ENGINE_AUTH_TOKEN is user {users[key]!r}'s token in "
                    f"ENGINE_AUTH_TOKENS_FILE; it stands for the user {DEFAULT_USER!r}"
                )
            users[key] = DEFAULT_USER
            longest = max(longest, len(token.encode()))
        self._users, self._longest = users, longest
        self.generation += 1
        return len(set(users.values()))

    def authenticate(self, token: str) -> str | None:
        """The user ``token`` stands for; None when a token is required and this one is not
        known.  Without any token configured, everyone is the user ``""``."""
        if not self._users:
            return ""
        return self._users.get(_digest(token))
