"""Config validation: clear messages with the key path, env overrides."""

from __future__ import annotations

import pytest

from router.config import ConfigError, parse_config

NODE = {"id": "a", "url": "http://127.0.0.1:9001", "models": ["m"]}


def test_defaults_are_the_embedded_default() -> None:
    cfg = parse_config(None, env={})
    assert cfg.listen.port == 8080
    assert cfg.policy.name == "score"
    assert cfg.state.redis_url is None
    assert cfg.retries.max_attempts == 3
    assert cfg.timeouts.first_byte_s == 30


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"listen": {"port": 80, "hots": "x"}}, "listen.hots: unknown key"),
        ({"nodes": [{**NODE, "url": "ftp://x"}]}, "nodes[0].url: must be an http://"),
        ({"nodes": [{**NODE, "models": []}]}, "nodes[0].models: List should have at least 1"),
        ({"nodes": [NODE, NODE]}, "duplicate node id 'a'"),
        ({"policy": {"name": "fastest"}}, "policy.name: unknown policy 'fastest'"),
        ({"timeouts": {"connect_s": -1}}, "timeouts.connect_s: Input should be greater than 0"),
        ({"nodes": [{**NODE, "api_key_env": "NOPE_KEY"}]}, "NOPE_KEY is not set"),
        ([1, 2], "<root>: the config must be a mapping"),
    ],
)
def test_errors_name_the_key(doc: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(doc, env={})
    assert message in str(info.value)


def test_env_overrides_redis_url() -> None:
    cfg = parse_config({"state": {"redis_url": None}}, env={"BALLAST_REDIS_URL": "redis://x:1/0"})
    assert cfg.state.redis_url == "redis://x:1/0"


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"state": {"redis_url": "http://x"}}, "state.redis_url: must be a redis://"),
        ({"state": {"cluster": True}}, "state.redis_url: required with state.cluster"),
        ({"registry": {"allowed_networks": ["10.0.0.0/33"]}}, "is not a CIDR network"),
        ({"registry": {"join_token_env": "NO_SUCH_VAR"}}, "registry.join_token_env: environment"),
    ],
)
def test_state_and_registry_errors(doc: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(doc, env={})
    assert message in str(info.value)
