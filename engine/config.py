"""The engine's one typed configuration: defaults < ``ENGINE_*`` environment < overrides.

The `Config` Struct is the single source of truth: every check (type, range, power of
two, allowed choices) is derived from its ``Annotated`` metadata, so the env parser, the
CLI flags and the docs can never drift apart. Bad values are reported, never clamped.
"""

import difflib
import operator
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import msgspec
from msgspec import Meta

from ipc.errors import EngineError

ENV_PREFIX = "ENGINE_"
MiB = 1 << 20
GiB = 1 << 30
_POW2 = {"power_of_two": True}  # Meta extra: the value must be a power of two
_SECRET = {"secret": True}  # Meta extra: never print the value
_URL = {"format": "empty, or a redis://, rediss:// or unix:// URL"}  # Meta extra: the pattern
_NAME = {"format": "letters, digits, '_', '.' and '-'"}


class ConfigError(EngineError):
    """Raised when a setting is unknown or its value is not one the engine accepts."""

    def __init__(self, *problems: str) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class Config(msgspec.Struct, frozen=True, kw_only=True):
    """Every engine knob; build it with `Config.from_env` so values are parsed and checked."""

    workers: Annotated[int, Meta(ge=1, le=256, description="Worker processes.")] = 2
    ring_bytes: Annotated[
        int, Meta(ge=65536, le=GiB, extra=_POW2, description="Bytes of each (worker, lane) ring.")
    ] = 4 * MiB
    return_ring_bytes: Annotated[
        int, Meta(ge=65536, le=GiB, extra=_POW2, description="Bytes of each return ring.")
    ] = 4 * MiB
    batch_size: Annotated[int, Meta(ge=1, le=65536, description="Max messages per batch.")] = 256
    batch_linger_s: Annotated[
        float,
        Meta(ge=0, le=10, description="Longest hold of a partial batch; 0 = flush when idle."),
    ] = 0.0
    delivery_concurrency: Annotated[
        int, Meta(ge=1, le=100000, description="Deliveries in flight per worker.")
    ] = 512
    recipient_concurrency: Annotated[
        int, Meta(ge=1, le=100000, description="Deliveries in flight per recipient; 1 keeps order.")
    ] = 1
    retry_max_attempts: Annotated[
        int, Meta(ge=1, le=1000, description="Delivery attempts, the first included.")
    ] = 5
    retry_backoff_base_s: Annotated[
        float, Meta(gt=0, le=3600, description="First retry backoff; doubles per attempt.")
    ] = 0.1
    retry_backoff_max_s: Annotated[
        float, Meta(gt=0, le=86400, description="Cap on one retry backoff.")
    ] = 30.0
    max_retry_hold_s: Annotated[
        float,
        Meta(
            ge=0,
            le=86400,
            description="Longest retry wait kept in the ring; a longer one is handed back to "
            "the dispatcher (0 = every delayed retry). Ignored in cluster mode.",
        ),
    ] = 5.0
    handler_timeout_s: Annotated[
        float, Meta(gt=0, le=86400, description="A longer handler call fails the attempt.")
    ] = 30.0
    default_ttl_s: Annotated[
        float, Meta(ge=0, le=31536000, description="TTL of messages that set none; 0 = none.")
    ] = 0.0
    heartbeat_interval_s: Annotated[
        float, Meta(gt=0, le=60, description="How often a worker reports it is alive.")
    ] = 0.5
    stall_timeout_s: Annotated[
        float, Meta(gt=0, le=3600, description="Heartbeat age at which a worker is restarted.")
    ] = 10.0
    shutdown_timeout_s: Annotated[
        float, Meta(ge=0, le=3600, description="Time to drain in-flight work on shutdown.")
    ] = 30.0
    stats_interval_s: Annotated[
        float, Meta(gt=0, le=3600, description="How often workers send statistics.")
    ] = 1.0
    poison_max_crashes: Annotated[
        int, Meta(ge=1, le=100, description="Worker crashes on one message before it is DLQ'd.")
    ] = 3
    starvation_limit: Annotated[
        int,
        Meta(
            ge=1,
            le=1000000,
            description="Higher-lane deliveries before a waiting lower lane gets one.",
        ),
    ] = 64
    max_recipient_bytes: Annotated[
        int,
        Meta(
            ge=1,
            le=MiB,
            description="Longest recipient, topic, sender, reply_to or dedup_key (UTF-8 bytes).",
        ),
    ] = 1024
    max_metadata_bytes: Annotated[
        int,
        Meta(
            ge=0,
            le=16 * MiB,
            description="Largest tags and metadata of one message (msgpack bytes, together).",
        ),
    ] = 65536
    host: Annotated[str, Meta(description="TCP/HTTP bind address.")] = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535, description="TCP ingress port; 0 = any.")] = 7878
    http_port: Annotated[int, Meta(ge=0, le=65535, description="HTTP port; 0 = any.")] = 7879
    socket: Annotated[str, Meta(description="Unix socket path; empty = off.")] = ""
    auth_token: Annotated[
        str,
        Meta(
            extra=_SECRET,
            description="Shared secret; needed for a non-loopback bind. As a command-line flag "
            "it is visible to other users in `ps`: prefer --auth-token-file "
            "(ENGINE_AUTH_TOKEN_FILE).",
        ),
    ] = ""
    auth_token_file: Annotated[
        str,
        Meta(
            description="File holding the shared secret (one line; the trailing newline is "
            "stripped); not with ENGINE_AUTH_TOKEN.",
        ),
    ] = ""
    max_frame_bytes: Annotated[
        int, Meta(ge=1024, le=GiB, description="Largest accepted ingress frame.")
    ] = 16 * MiB
    max_connections: Annotated[
        int, Meta(ge=1, le=100000, description="Concurrent ingress connections.")
    ] = 1024
    hello_timeout_s: Annotated[
        float,
        Meta(gt=0, le=3600, description="Time an ingress connection has to send its Hello."),
    ] = 10.0
    http_max_connections: Annotated[
        int,
        Meta(ge=1, le=100000, description="Concurrent HTTP connections; more get 503 and close."),
    ] = 512
    http_settled_timeout_s: Annotated[
        float,
        Meta(
            gt=0,
            le=86400,
            description="Longest wait of POST /v1/messages?settled=1 for settlement; then 504.",
        ),
    ] = 30.0
    allowed_hosts: Annotated[
        str,
        Meta(
            description="Host names HTTP requests may name (Host, Origin) besides the bound "
            "address and localhost: a comma list; * = any.",
        ),
    ] = ""
    handler: Annotated[str, Meta(description="Handler as module:function.")] = ""
    sink: Annotated[
        Literal["python", "mock", "inbox", "null"], Meta(description="Delivery protocol.")
    ] = "python"
    mock_delay_s: Annotated[float, Meta(ge=0, le=60, description="Mock sink delay.")] = 0.0
    mock_success_rate: Annotated[
        float, Meta(ge=0, le=1, description="Share of mock deliveries that succeed.")
    ] = 1.0
    mock_record_dir: Annotated[
        str,
        Meta(description="Mock sink: directory of per-worker files of delivered ids; empty = off."),
    ] = ""
    inbox_dir: Annotated[str, Meta(description="Directory of the inbox sink.")] = ""
    dlq_max: Annotated[int, Meta(ge=0, le=10**7, description="Dead letters kept.")] = 10000
    dlq_path: Annotated[str, Meta(description="Dead-letter JSON-lines file; empty = off.")] = ""
    dlq_restore: Annotated[
        int,
        Meta(
            ge=0,
            le=1,
            description="1: load ENGINE_DLQ_PATH's letters at start (not replayed ones); 0: not.",
        ),
    ] = 1
    max_worker_rss_bytes: Annotated[
        int, Meta(ge=0, description="Recycle a worker above this RSS; 0 = off.")
    ] = 0
    max_messages_per_worker: Annotated[
        int, Meta(ge=0, description="Recycle a worker after this many messages; 0 = off.")
    ] = 0
    ring_warn_ratio: Annotated[
        float, Meta(ge=0, le=1, description="Ring fill ratio at which /readyz says not ready.")
    ] = 0.8
    degraded_failure_ratio: Annotated[
        float,
        Meta(
            gt=0,
            le=1,
            description="Failed share of recent delivery attempts (the last 5 s or stats "
            "interval) at which /readyz says degraded.",
        ),
    ] = 0.5
    backlog_top: Annotated[
        int,
        Meta(
            ge=0,
            le=1000,
            description="Recipients with the largest backlog in /stats and /metrics; 0 = off.",
        ),
    ] = 10
    start_method: Annotated[
        Literal["auto", "fork", "forkserver", "spawn"], Meta(description="Process start method.")
    ] = "auto"
    log_level: Annotated[
        Literal["DEBUG", "INFO", "WARNING", "ERROR"], Meta(description="Log level.")
    ] = "INFO"
    log_format: Annotated[Literal["text", "json"], Meta(description="Log line format.")] = "text"
    log_limit_interval_s: Annotated[
        float,
        Meta(
            ge=0,
            le=3600,
            description="Per peer and reason, one ingress warning line per this interval; "
            "the next one counts what was held back.",
        ),
    ] = 10.0
    # -- users, batch requests, response cache, idempotent submits, rate limits (issue 13) --
    auth_tokens_file: Annotated[
        str, Meta(description="File of USER TOKEN lines (one user per token); SIGHUP reloads.")
    ] = ""
    batch_concurrency: Annotated[
        int, Meta(ge=1, le=10000, description="Requests of one batch running at once.")
    ] = 20
    batch_max_requests: Annotated[
        int, Meta(ge=1, le=1000000, description="Most requests one batch may hold.")
    ] = 10000
    batch_retries: Annotated[
        int, Meta(ge=0, le=100, description="Retries of a batch request that timed out.")
    ] = 2
    cache_size: Annotated[
        int, Meta(ge=0, le=10**7, description="Cached responses kept (LRU); 0 = no cache.")
    ] = 2000
    cache_ttl_s: Annotated[
        float, Meta(gt=0, le=86400, description="Lifetime of a cached response.")
    ] = 120.0
    dedup_window_s: Annotated[
        float, Meta(ge=0, le=86400, description="How long a dedup_key is remembered; 0 = off.")
    ] = 300.0
    dedup_max: Annotated[
        int, Meta(ge=1, le=10**7, description="dedup_keys remembered at most (oldest go first).")
    ] = 100000
    rate_limit: Annotated[
        float, Meta(ge=0, le=10**9, description="Messages per second per user; 0 = no limit.")
    ] = 0.0
    rate_burst: Annotated[
        int, Meta(ge=0, le=10**9, description="Burst above the rate; 0 = one second's worth.")
    ] = 0
    # -- cluster mode (engine.broker); inert while ``broker`` is empty ----------------
    broker: Annotated[
        str,
        Meta(
            pattern=r"^$|^(redis|rediss|unix)://",
            extra=_URL,
            description="Cluster mode: redis://HOST:PORT/DB, rediss:// or unix://; empty = off.",
        ),
    ] = ""
    partitions: Annotated[
        int,
        Meta(ge=1, le=16384, description="Partition streams; fixed for a namespace once stored."),
    ] = 64
    namespace: Annotated[
        str,
        Meta(
            pattern=r"^[A-Za-z0-9_.-]+$",
            extra=_NAME,
            description="Key prefix of the cluster's keys.",
        ),
    ] = "ringway"
    node_id: Annotated[
        str,
        Meta(
            pattern=r"^[A-Za-z0-9_.-]*$",
            extra=_NAME,
            description="This node's name; empty = host-pid.",
        ),
    ] = ""
    lease_ttl_s: Annotated[
        float, Meta(ge=0.2, le=600, description="Partition lease; a dead node's expire after it.")
    ] = 5.0
    broker_read_count: Annotated[
        int, Meta(ge=1, le=10000, description="Stream entries per XREADGROUP of one partition.")
    ] = 16

    def __post_init__(self) -> None:
        """Check values built directly in code too, so no path skips validation."""
        values = msgspec.structs.asdict(self)
        problems = [p for n, s in _SPECS.items() if (p := _check(s, values[n], n)[1])]
        if not problems:
            problems = _cross_problems(values, dict.fromkeys(_SPECS, "code"))
        if problems:
            raise ConfigError(*problems)

    def shared_token(self) -> str:
        """The shared secret: ``auth_token``, or the content of ``auth_token_file``."""
        return read_token_file(self.auth_token_file) if self.auth_token_file else self.auth_token

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> "Config":
        """Build from ``env`` (default ``os.environ``) with keyword overrides winning."""
        return resolve_config(env, overrides)[0]


def read_token_file(path: str) -> str:
    """The token held by ``path`` (ENGINE_AUTH_TOKEN_FILE), its trailing newline stripped.

    Read at each call, so a SIGHUP reload picks up a rotated token.  An
    unreadable, empty or multi-line file is a `ConfigError` naming the path.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read ENGINE_AUTH_TOKEN_FILE={path}: {exc}") from exc
    token = text.rstrip("\r\n")
    if not token.strip():
        raise ConfigError(f"ENGINE_AUTH_TOKEN_FILE={path} is empty: it must hold the token")
    if "\n" in token or token != token.strip():
        raise ConfigError(
            f"ENGINE_AUTH_TOKEN_FILE={path} must hold the token alone on one line, without "
            "surrounding spaces (several users: ENGINE_AUTH_TOKENS_FILE)"
        )
    return token


# Cross-field rules: (field, must be >= this field).
_AT_LEAST = (("retry_backoff_max_s", "retry_backoff_base_s"),)
_OPS: dict[str, Callable[[Any, Any], bool]] = {
    ">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le
}  # fmt: skip
_INT_RE = re.compile(r"[+-]?[0-9]+")
_ACCEPTS: dict[type, tuple[type, ...]] = {int: (int,), float: (int, float), str: (str,)}
_INVALID = object()


@dataclass(frozen=True, slots=True)
class _Spec:
    """What one field accepts, read from the Struct's metadata."""

    name: str
    env: str
    kind: type  # int, float or str
    choices: tuple[str, ...]  # non-empty for Literal fields
    bounds: tuple[tuple[str, float], ...]  # (operator, limit)
    power_of_two: bool
    pattern: str  # a regex a string value must match; empty = any
    pattern_text: str  # the pattern in words, for messages and docs
    secret: bool
    default: object
    description: str

    @property
    def requirement(self) -> str:
        """The accepted values in words, e.g. ``an integer >= 1 and <= 256``."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.kind is str:
            if self.pattern:
                return self.pattern_text or f"a string matching {self.pattern}"
            return "a string"
        noun = "an integer" if self.kind is int else "a number"
        noun = "a power of two" if self.power_of_two else noun
        limits = " and ".join(f"{op} {_num(limit)}" for op, limit in self.bounds)
        return f"{noun} {limits}".rstrip()


class FieldDoc(msgspec.Struct, frozen=True, kw_only=True):
    """One setting as shown in docs and by ``engine config``."""

    name: str
    env: str
    type_name: str
    default: object
    allowed: str
    description: str
    secret: bool = False


def _num(limit: float) -> str:
    return str(int(limit)) if float(limit).is_integer() else repr(limit)


def _build_specs() -> dict[str, _Spec]:
    """Read every field's checks from its ``Annotated[type, Meta(...)]`` declaration."""
    specs: dict[str, _Spec] = {}
    for field in msgspec.structs.fields(Config):
        base, meta = get_args(field.type)  # every field is Annotated[..., Meta(...)]
        choices = get_args(base) if get_origin(base) is Literal else ()
        bounds = tuple(
            (op, limit)
            for op, limit in ((">", meta.gt), (">=", meta.ge), ("<", meta.lt), ("<=", meta.le))
            if limit is not None
        )
        extra = meta.extra or {}
        specs[field.name] = _Spec(
            name=field.name,
            env=ENV_PREFIX + field.name.upper(),
            kind=str if choices else base,
            choices=choices,
            bounds=bounds,
            power_of_two=bool(extra.get("power_of_two")),
            pattern=meta.pattern or "",
            pattern_text=str(extra.get("format", "")),
            secret=bool(extra.get("secret")),
            default=field.default,
            description=meta.description or "",
        )
    return specs


def _convert(spec: _Spec, raw: object) -> object:
    """Turn a string (env, CLI) or a Python value into the field's type, or ``_INVALID``."""
    if isinstance(raw, str) and spec.kind is not str:
        text = raw.strip()
        plain = _INT_RE.fullmatch(text) if spec.kind is int else "_" not in text
        try:
            return spec.kind(text) if plain else _INVALID
        except ValueError:  # not a number, or an int too long to convert
            return _INVALID
    if isinstance(raw, bool) or not isinstance(raw, _ACCEPTS[spec.kind]):
        return _INVALID
    return float(raw) if spec.kind is float and isinstance(raw, int | float) else raw


def _check(spec: _Spec, raw: object, label: str) -> tuple[object, str | None]:
    """Return ``(value, None)`` or ``(None, problem)``; one message for type and range."""
    value = _convert(spec, raw)
    ok = value is not _INVALID
    if ok and spec.choices:
        ok = value in spec.choices
    elif ok and spec.pattern:
        ok = isinstance(value, str) and re.search(spec.pattern, value) is not None
    elif ok and spec.kind is not str:
        ok = all(_OPS[op](value, limit) for op, limit in spec.bounds)  # NaN fails here
        if ok and spec.power_of_two:
            ok = isinstance(value, int) and value > 0 and value & (value - 1) == 0
    if ok:
        return value, None
    return None, f"{label} must be {spec.requirement}, got {raw!r}"


def _label(spec: _Spec, source: str) -> str:
    if source in ("env", "default"):
        return spec.env
    return spec.name if source == "code" else f"{spec.name} ({source})"


def _cross_problems(values: Mapping[str, Any], sources: Mapping[str, str]) -> list[str]:
    """Check the rules between fields; a field whose own check failed (None) is skipped."""
    problems = []
    if values.get("auth_token") and values.get("auth_token_file"):
        token = _label(_SPECS["auth_token"], sources["auth_token"])
        path = _label(_SPECS["auth_token_file"], sources["auth_token_file"])
        problems.append(f"{token} and {path} are both set: give the token one way")
    for high, low in _AT_LEAST:
        hi = values.get(high, _SPECS[high].default)
        lo = values.get(low, _SPECS[low].default)
        if hi is not None and lo is not None and hi < lo:
            hi_label = _label(_SPECS[high], sources[high])
            lo_label = _label(_SPECS[low], sources[low])
            problems.append(f"{hi_label} must be >= {lo_label} ({lo!r}), got {hi!r}")
    return problems


def _suggest(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1)
    return f"; did you mean {close[0]}?" if close else ""


NEAR_MISS_CUTOFF = 0.8
"""How alike (difflib ratio, after ``ENGINE_``) an unknown name must be to count as a typo."""


def near_miss(key: str) -> str | None:
    """The setting an unknown ``ENGINE_*`` name is a typo of, or None.

    Names are compared without the shared ``ENGINE_`` prefix, which would make
    every name look alike: ``ENGINE_WORKRS`` is a typo of ``ENGINE_WORKERS``,
    ``ENGINE_ENV`` is someone else's variable.
    """
    suffix = key.removeprefix(ENV_PREFIX)
    names = [s.env.removeprefix(ENV_PREFIX) for s in _SPECS.values()]
    close = difflib.get_close_matches(suffix, names, n=1, cutoff=NEAR_MISS_CUTOFF)
    return ENV_PREFIX + close[0] if close else None


def foreign_env(env: Mapping[str, str] | None = None) -> list[str]:
    """``ENGINE_*`` names that are no setting and no typo of one: ignored, worth a warning."""
    env = os.environ if env is None else env
    known = {s.env for s in _SPECS.values()}
    return sorted(
        k for k in env if k.startswith(ENV_PREFIX) and k not in known and near_miss(k) is None
    )


def resolve_config(
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
    *,
    source_label: str = "argument",
) -> tuple[Config, dict[str, str]]:
    """Build the Config and say where each value came from: default, env or ``source_label``.

    All problems are collected and raised together in one `ConfigError`; an environment
    value that an override replaces is not used, so it is not checked either.  An
    unknown ``ENGINE_*`` name is a problem only when it is a near miss of a setting
    (a typo); others are ignored here and listed by `foreign_env`.
    """
    env = os.environ if env is None else env
    overrides = overrides or {}
    values: dict[str, Any] = {}
    sources = dict.fromkeys(_SPECS, "default")
    problems: list[str] = []
    by_env = {s.env: s for s in _SPECS.values()}
    for key in sorted(k for k in env if k.startswith(ENV_PREFIX)):
        spec = by_env.get(key)
        if spec is None:
            # A typo of a setting stops start-up; any other ENGINE_* name (ENGINE_ENV=prod
            # for the user's own code) is not ours: `foreign_env` lists it for a warning.
            if (typo := near_miss(key)) is not None:
                problems.append(f"{key} is not a known setting; did you mean {typo}?")
        elif spec.name not in overrides:
            values[spec.name], problem = _check(spec, env[key], key)
            sources[spec.name] = "env"
            problems.extend(filter(None, [problem]))
    for name, raw in overrides.items():
        if name not in _SPECS:
            hint = _suggest(name, list(_SPECS))
            problems.append(f"{name} ({source_label}) is not a known setting{hint}")
            continue
        sources[name] = source_label
        values[name], problem = _check(_SPECS[name], raw, _label(_SPECS[name], source_label))
        problems.extend(filter(None, [problem]))
    problems += _cross_problems(values, sources)
    if problems:
        raise ConfigError(*problems)
    return Config(**values), sources


def describe_fields() -> list[FieldDoc]:
    """Every setting with its env var, type, default and allowed values, in field order."""
    return [
        FieldDoc(
            name=s.name,
            env=s.env,
            type_name="choice" if s.choices else s.kind.__name__,
            default=s.default,
            allowed=s.requirement,
            description=s.description,
            secret=s.secret,
        )
        for s in _SPECS.values()
    ]


_SPECS = _build_specs()
