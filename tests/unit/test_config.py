"""Config parsing: defaults, env values, precedence, and the exact error messages."""

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.config import Config, ConfigError, describe_fields, resolve_config
from ipc.errors import EngineError


def error_of(env: dict[str, str], **overrides: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        Config.from_env(env, **overrides)
    return info.value


def test_defaults() -> None:
    config = Config.from_env({})
    assert config == Config()
    assert config.workers == 2
    assert config.ring_bytes == 4 * 1024 * 1024
    assert config.batch_linger_s == 0.0
    assert config.sink == "python"
    assert config.log_level == "INFO"
    assert config.default_ttl_s == 0.0


def test_env_values_are_parsed_to_field_types() -> None:
    config = Config.from_env(
        {
            "ENGINE_WORKERS": "8",
            "ENGINE_BATCH_LINGER_S": "1e-3",
            "ENGINE_RING_BYTES": "65536",
            "ENGINE_SINK": "mock",
            "ENGINE_HOST": "0.0.0.0",
            "ENGINE_MOCK_SUCCESS_RATE": "0.5",
            "PATH": "/usr/bin",  # not ENGINE_*: ignored
        }
    )
    assert config.workers == 8
    assert config.batch_linger_s == pytest.approx(0.001)
    assert isinstance(config.mock_success_rate, float)
    assert config.mock_success_rate == 0.5
    assert config.ring_bytes == 65536
    assert config.sink == "mock"
    assert config.host == "0.0.0.0"


def test_precedence_override_beats_env_beats_default() -> None:
    env = {"ENGINE_WORKERS": "5", "ENGINE_BATCH_SIZE": "100"}
    config, sources = resolve_config(env, {"workers": "3"}, source_label="cli")
    assert (config.workers, sources["workers"]) == (3, "cli")
    assert (config.batch_size, sources["batch_size"]) == (100, "env")
    assert (config.port, sources["port"]) == (7878, "default")
    assert set(sources) == set(Config.__struct_fields__)


def test_from_env_overrides_are_validated_like_env_values() -> None:
    assert Config.from_env({"ENGINE_WORKERS": "5"}, workers=4).workers == 4
    assert Config.from_env({}, batch_linger_s=0).batch_linger_s == 0.0
    assert "workers (argument) must be an integer" in str(error_of({}, workers=3.5))
    assert "workers (argument)" in str(error_of({}, workers=True))
    assert "got 0" in str(error_of({}, workers=0))
    assert "is not a known setting; did you mean workers?" in str(error_of({}, wokers=3))


def test_integer_error_messages_are_exact() -> None:
    expected = "ENGINE_WORKERS must be an integer >= 1 and <= 256, got {!r}"
    for value in ("abc", "0", "257", "2.0", "4_000", ""):
        assert str(error_of({"ENGINE_WORKERS": value})) == expected.format(value)


def test_float_error_message() -> None:
    assert (
        str(error_of({"ENGINE_BATCH_LINGER_S": "-1"}))
        == "ENGINE_BATCH_LINGER_S must be a number >= 0 and <= 10, got '-1'"
    )
    message = str(error_of({"ENGINE_HEARTBEAT_INTERVAL_S": "nan"}))
    assert message == "ENGINE_HEARTBEAT_INTERVAL_S must be a number > 0 and <= 60, got 'nan'"


def test_power_of_two() -> None:
    assert Config.from_env({"ENGINE_RING_BYTES": str(1 << 20)}).ring_bytes == 1 << 20
    for value in ("1000", "65537", "98304", str(1 << 31)):
        assert str(error_of({"ENGINE_RING_BYTES": value})) == (
            f"ENGINE_RING_BYTES must be a power of two >= 65536 and <= 1073741824, got {value!r}"
        )
    assert "ENGINE_RETURN_RING_BYTES must be a power of two" in str(
        error_of({"ENGINE_RETURN_RING_BYTES": "100000"})
    )


def test_literal_error_lists_choices_in_declared_order() -> None:
    assert (
        str(error_of({"ENGINE_SINK": "kafka"}))
        == "ENGINE_SINK must be one of python, mock, inbox, null, got 'kafka'"
    )
    assert "ENGINE_LOG_LEVEL must be one of DEBUG, INFO" in str(
        error_of({"ENGINE_LOG_LEVEL": "debug"})
    )


def test_unknown_env_var_is_named_with_a_suggestion() -> None:
    error = error_of({"ENGINE_WORKRS": "4"})
    assert str(error) == "ENGINE_WORKRS is not a known setting; did you mean ENGINE_WORKERS?"
    assert "did you mean ENGINE_LOG_LEVEL?" in str(error_of({"ENGINE_LOGLEVEL": "DEBUG"}))


def test_all_problems_are_reported_together() -> None:
    error = error_of(
        {"ENGINE_WORKERS": "abc", "ENGINE_SINK": "kafka", "ENGINE_BATHC_SIZE": "1"},
        port=70000,
    )
    assert isinstance(error, EngineError)
    assert len(error.problems) == 4
    lines = str(error).splitlines()
    assert lines == list(error.problems)
    assert any(line.startswith("ENGINE_WORKERS must be") for line in lines)
    assert any(line.startswith("ENGINE_SINK must be") for line in lines)
    assert any("did you mean ENGINE_BATCH_SIZE?" in line for line in lines)
    assert any(line.startswith("port (argument) must be an integer >= 0") for line in lines)


def test_backoff_max_must_not_be_below_base() -> None:
    error = error_of({"ENGINE_RETRY_BACKOFF_BASE_S": "2", "ENGINE_RETRY_BACKOFF_MAX_S": "1"})
    assert str(error) == (
        "ENGINE_RETRY_BACKOFF_MAX_S must be >= ENGINE_RETRY_BACKOFF_BASE_S (2.0), got 1.0"
    )
    # Against the default max (30 s), too:
    assert "ENGINE_RETRY_BACKOFF_MAX_S must be >=" in str(
        error_of({"ENGINE_RETRY_BACKOFF_BASE_S": "100"})
    )
    config = Config.from_env(
        {"ENGINE_RETRY_BACKOFF_BASE_S": "2", "ENGINE_RETRY_BACKOFF_MAX_S": "2"}
    )
    assert config.retry_backoff_max_s == config.retry_backoff_base_s == 2.0


def test_direct_construction_and_replace_are_checked_too() -> None:
    with pytest.raises(ConfigError, match="workers must be an integer >= 1 and <= 256, got 0"):
        Config(workers=0)
    with pytest.raises(ConfigError, match="retry_backoff_max_s must be >="):
        msgspec.structs.replace(Config(), retry_backoff_max_s=0.01)


def test_describe_fields_covers_every_field() -> None:
    docs = {d.name: d for d in describe_fields()}
    assert list(docs) == list(Config.__struct_fields__)
    workers = docs["workers"]
    assert (workers.env, workers.type_name, workers.default) == ("ENGINE_WORKERS", "int", 2)
    assert workers.allowed == "an integer >= 1 and <= 256"
    assert workers.description
    assert docs["sink"].allowed == "one of python, mock, inbox, null"
    assert docs["auth_token"].secret
    assert not docs["host"].secret
    assert all(d.description for d in docs.values())


@given(st.one_of(st.integers(-(10**40), 10**40), st.integers(min_value=-5, max_value=300)))
def test_workers_parses_exactly_or_fails_never_clamps(n: int) -> None:
    try:
        config = Config.from_env({"ENGINE_WORKERS": str(n)})
    except ConfigError as exc:
        assert not 1 <= n <= 256
        assert str(exc).startswith("ENGINE_WORKERS must be an integer >= 1 and <= 256")
        assert repr(str(n)) in str(exc)
    else:
        assert 1 <= n <= 256
        assert config.workers == n


def test_an_engine_variable_that_is_no_typo_is_ignored_and_listed_for_a_warning() -> None:
    from engine.config import foreign_env

    env = {"ENGINE_ENV": "prod", "ENGINE_ZZZZZZZZZZZZ": "1", "ENGINE_WORKERS": "3"}
    config, sources = resolve_config(env)
    assert config.workers == 3 and sources["workers"] == "env"
    assert foreign_env(env) == ["ENGINE_ENV", "ENGINE_ZZZZZZZZZZZZ"]
    assert foreign_env({"ENGINE_WORKRS": "4", "ENGINE_WORKERS": "1"}) == []  # a typo: an error
