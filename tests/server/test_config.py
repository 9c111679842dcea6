"""Server configuration: key parsing and the options ServerConfig refuses."""

from __future__ import annotations

from typing import Any

import pytest

from callboard.server.config import (
    DEV_API_KEY,
    DEV_API_SECRET,
    KEYS_ENV,
    ConfigError,
    ServerConfig,
    parse_keys,
)


@pytest.mark.parametrize(
    ("text", "keys"),
    [
        ("key: secret", {"key": "secret"}),
        ("a: one, b: two", {"a": "one", "b": "two"}),
        ("a: one\nb: two\n", {"a": "one", "b": "two"}),
        ("  a:one ,\n\n b :  two  ", {"a": "one", "b": "two"}),
        ("k: sec:ret", {"k": "sec:ret"}),
        ("", {}),
        (" , \n ", {}),
    ],
)
def test_parse_keys_accepts_key_secret_pairs(text: str, keys: dict[str, str]) -> None:
    assert parse_keys(text) == keys


@pytest.mark.parametrize(
    ("text", "entry"),
    [
        ("key-without-secret:", "for key 'key-without-secret'"),
        ("good: x, key-only", "#2"),
        (": s3cr3t-without-key", "#1"),
        ("forgot-the-colon s3cr3t", "#1"),
    ],
)
def test_parse_keys_refuses_bad_entries_without_echoing_a_secret(text: str, entry: str) -> None:
    with pytest.raises(ConfigError) as refused:
        parse_keys(text)
    message = str(refused.value)
    assert f"invalid API key entry {entry}:" in message
    assert "expected 'key: secret'" in message and KEYS_ENV in message
    assert "s3cr3t" not in message


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.com"])
def test_dev_keys_on_a_non_loopback_address_need_dev(host: str) -> None:
    with pytest.raises(ConfigError) as refused:
        ServerConfig(host=host)
    message = str(refused.value)
    assert f"refusing to listen on {host} with the public dev keys" in message
    assert "--keys" in message and "--dev" in message and KEYS_ENV in message
    assert ServerConfig(host=host, dev=True).effective_keys == {DEV_API_KEY: DEV_API_SECRET}
    assert ServerConfig(host=host, keys={"k": "s"}).effective_keys == {"k": "s"}


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_dev_keys_on_loopback_are_allowed(host: str) -> None:
    config = ServerConfig(host=host)
    assert config.uses_dev_keys
    assert config.effective_keys == {DEV_API_KEY: DEV_API_SECRET}


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("port", -1, "port must be in 0..65535"),
        ("port", 65536, "port must be in 0..65535"),
        ("register_timeout", 0, "register_timeout must be > 0"),
        ("availability_timeout", -1.0, "availability_timeout must be > 0"),
        ("migration_grace", 0.0, "migration_grace must be > 0"),
        ("token_leeway", -0.5, "token_leeway must be >= 0"),
    ],
)
def test_out_of_range_options_are_refused(option: str, value: float, message: str) -> None:
    options: dict[str, Any] = {option: value}
    with pytest.raises(ConfigError, match=message):
        ServerConfig(**options)


def test_keys_come_from_the_environment_unless_overridden(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(KEYS_ENV, "envkey: envsecret")
    assert ServerConfig.from_env().keys == {"envkey": "envsecret"}
    assert ServerConfig.from_env(keys={"cli": "s"}).keys == {"cli": "s"}
    assert ServerConfig.from_env(keys=None, port=0).keys == {"envkey": "envsecret"}
    # With real keys in the environment a public address needs no --dev.
    assert ServerConfig.from_env(host="0.0.0.0").host == "0.0.0.0"


def test_bad_keys_in_the_environment_are_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEYS_ENV, "nocolon")
    with pytest.raises(ConfigError, match=KEYS_ENV):
        ServerConfig.from_env()
