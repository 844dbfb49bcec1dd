import pytest

from llmplatform.env import ImproperlyConfiguredEnv, env_bool, env_float, env_int, env_list


def test_a_malformed_integer_names_its_variable(monkeypatch):
    monkeypatch.setenv("LLMP_SOMETHING", "four")
    with pytest.raises(ImproperlyConfiguredEnv, match="LLMP_SOMETHING must be an integer"):
        env_int("LLMP_SOMETHING", 1)


def test_a_value_below_its_minimum_is_refused(monkeypatch):
    monkeypatch.setenv("LLMP_SOMETHING", "0.1")
    with pytest.raises(ImproperlyConfiguredEnv, match=">= 1"):
        env_float("LLMP_SOMETHING", 2.0, minimum=1.0)


def test_an_integer_above_its_maximum_is_refused(monkeypatch):
    monkeypatch.setenv("LLMP_STREAM_INTERVAL_MS", "250")
    with pytest.raises(ImproperlyConfiguredEnv, match="LLMP_STREAM_INTERVAL_MS must be <= 100, got 250"):
        env_int("LLMP_STREAM_INTERVAL_MS", 25, minimum=0, maximum=100)
    monkeypatch.setenv("LLMP_STREAM_INTERVAL_MS", "100")
    assert env_int("LLMP_STREAM_INTERVAL_MS", 25, minimum=0, maximum=100) == 100


def test_booleans_accept_only_known_words(monkeypatch):
    monkeypatch.setenv("LLMP_FLAG", "yes")
    assert env_bool("LLMP_FLAG", False) is True
    monkeypatch.setenv("LLMP_FLAG", "maybe")
    with pytest.raises(ImproperlyConfiguredEnv):
        env_bool("LLMP_FLAG", False)


def test_unset_and_empty_values_take_the_default(monkeypatch):
    monkeypatch.delenv("LLMP_UNSET", raising=False)
    monkeypatch.setenv("LLMP_EMPTY", "")
    assert env_int("LLMP_UNSET", 3) == 3
    assert env_list("LLMP_EMPTY", ["a"]) == ["a"]
