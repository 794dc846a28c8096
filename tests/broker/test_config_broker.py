"""The cluster-mode settings are checked like every other: bad values are named, never clamped."""

from __future__ import annotations

import pytest

from engine.config import Config, ConfigError


def test_broker_urls() -> None:
    for url in ("", "redis://127.0.0.1:6379/0", "rediss://h:6380/1", "unix:///tmp/redis.sock"):
        assert Config.from_env({"ENGINE_BROKER": url}).broker == url
    with pytest.raises(ConfigError, match=r"ENGINE_BROKER must be empty, or a redis://"):
        Config.from_env({"ENGINE_BROKER": "http://127.0.0.1:6379"})


def test_names_and_ranges() -> None:
    with pytest.raises(ConfigError, match="ENGINE_NAMESPACE must be letters"):
        Config.from_env({"ENGINE_NAMESPACE": "a{b}"})  # braces would break the hash tags
    with pytest.raises(ConfigError, match="ENGINE_NODE_ID must be letters"):
        Config.from_env({"ENGINE_NODE_ID": "node/1"})  # '/' separates node and epoch
    with pytest.raises(ConfigError, match="ENGINE_PARTITIONS must be an integer >= 1"):
        Config.from_env({"ENGINE_PARTITIONS": "0"})
    with pytest.raises(ConfigError, match=r"ENGINE_LEASE_TTL_S must be a number >= 0\.2"):
        Config.from_env({"ENGINE_LEASE_TTL_S": "0.1"})
    cfg = Config.from_env({})
    assert (cfg.broker, cfg.partitions, cfg.namespace, cfg.node_id, cfg.lease_ttl_s) == (
        "",
        64,
        "ringway",
        "",
        5.0,
    )
