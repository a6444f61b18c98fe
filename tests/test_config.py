"""Settings from keyword arguments and CALLBOT_* variables."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from callbot import CallBot, ConfigurationError, Settings


def test_environment_variables_are_read_and_converted() -> None:
    env = {
        "CALLBOT_APP_ID": "app",
        "CALLBOT_TENANT_ID": "tenant",
        "CALLBOT_PUBLIC_URL": "https://bot.example.test/",
        "CALLBOT_PORT": "9000",
        "CALLBOT_REORDER_WINDOW": "0.5",
        "CALLBOT_KEEP_ALIVE": "false",
        "CALLBOT_ALLOWED_TENANTS": "t1, t2,",
    }
    settings = Settings.from_env(env)
    assert settings.app_id == "app"
    assert settings.port == 9000
    assert settings.reorder_window == 0.5
    assert settings.keep_alive is False
    assert settings.allowed_tenants == frozenset({"t1", "t2"})
    assert settings.callback_url == "https://bot.example.test/api/calls"
    assert settings.token_url == "https://login.microsoftonline.com/tenant/oauth2/v2.0/token"


def test_keyword_arguments_win_over_the_environment() -> None:
    settings = Settings.from_env({"CALLBOT_APP_ID": "from-env"}, app_id="from-code")
    assert settings.app_id == "from-code"


def test_a_value_that_cannot_be_read_names_the_variable() -> None:
    with pytest.raises(ConfigurationError, match="CALLBOT_PORT"):
        Settings.from_env({"CALLBOT_APP_ID": "a", "CALLBOT_PORT": "eighty"})
    with pytest.raises(ConfigurationError, match="CALLBOT_KEEP_ALIVE"):
        Settings.from_env({"CALLBOT_APP_ID": "a", "CALLBOT_KEEP_ALIVE": "maybe"})


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "1e400"])
def test_every_number_setting_must_be_finite(value: str) -> None:
    """``float("nan")`` passed every range check: a NaN ``token_leeway`` or
    ``max_token_lifetime`` accepted expired and year-3000 tokens."""
    floats = [f.name for f in dataclasses.fields(Settings) if f.type in ("float", "float | None")]
    assert {"token_leeway", "max_token_lifetime", "header_timeout"} <= set(floats)
    for name in floats:
        with pytest.raises(ConfigurationError, match=f"CALLBOT_{name.upper()}"):
            Settings.from_env({"CALLBOT_APP_ID": "a", f"CALLBOT_{name.upper()}": value})
    with pytest.raises(ConfigurationError, match="finite"):
        Settings(app_id="a", token_leeway=float("nan"))


@pytest.mark.parametrize("port", ["-1", "65536", "99999"])
def test_a_port_outside_the_range_names_the_variable(port: str) -> None:
    with pytest.raises(ConfigurationError, match="CALLBOT_PORT"):
        Settings.from_env({"CALLBOT_APP_ID": "a", "CALLBOT_PORT": port})


def test_public_url_must_be_https_unless_explicitly_allowed() -> None:
    with pytest.raises(ConfigurationError, match="https"):
        Settings(app_id="a", public_url="http://bot.example.test")
    allowed = Settings(
        app_id="a", public_url="http://127.0.0.1:8080", allow_insecure_public_url=True
    )
    assert allowed.callback_url == "http://127.0.0.1:8080/api/calls"
    with pytest.raises(ConfigurationError, match="absolute"):
        Settings(app_id="a", public_url="bot.example.test")


def test_missing_settings_are_named_when_needed() -> None:
    settings = Settings(app_id="a")
    with pytest.raises(ConfigurationError, match="CALLBOT_PUBLIC_URL"):
        _ = settings.callback_url
    with pytest.raises(ConfigurationError, match="CALLBOT_TENANT_ID"):
        _ = settings.token_url


async def test_a_bot_without_app_id_fails_at_start_naming_it() -> None:
    bot = CallBot.from_env()
    with pytest.raises(ConfigurationError, match="CALLBOT_APP_ID"):
        await bot.start()
    assert not bot.ready


def test_configure_changes_settings_before_start() -> None:
    bot = CallBot(app_id="a")
    bot.configure(app_id="b", reorder_window=0.1)
    assert bot.settings.app_id == "b"
    assert bot.settings.reorder_window == 0.1


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("CALLBOT_KEEP_ALIVE_INTERVAL", "-5"),  # every keep-alive due at once, back to back
        ("CALLBOT_KEEP_ALIVE_INTERVAL", "0"),
        ("CALLBOT_KEY_REFRESH_INTERVAL", "0"),
        ("CALLBOT_GRAPH_REQUEST_TIMEOUT", "0"),
        ("CALLBOT_SHUTDOWN_TIMEOUT", "-1"),
        ("CALLBOT_GRAPH_RETRY_TIME", "-1"),
        ("CALLBOT_TOKEN_CACHE_BYTES", "-1"),
        ("CALLBOT_MAX_JSON_DEPTH", "0"),
        # Every callback refused (413), while routes of the author's took bodies of any size.
        ("CALLBOT_MAX_BODY_BYTES", "0"),
        # A leeway of hours accepted tokens expired hours ago.
        ("CALLBOT_TOKEN_LEEWAY", "86400"),
        # Redis took no such lease: the bot started, then answered every callback 503.
        ("CALLBOT_STORE_LEASE", "1e300"),
    ],
)
def test_durations_sizes_and_counts_out_of_range_are_refused(variable: str, value: str) -> None:
    with pytest.raises(ConfigurationError, match=variable):
        Settings.from_env({"CALLBOT_APP_ID": "a", variable: value})


def test_a_value_ending_in_a_newline_is_read_without_it() -> None:
    """A value from a file or a Kubernetes Secret (``echo $ID | base64``) ends in a newline:
    kept, the app id matched no token's audience and every callback got 401."""
    settings = Settings.from_env(
        {"CALLBOT_APP_ID": "app-id\n", "CALLBOT_PUBLIC_URL": " https://bot.example.test\n"}
    )
    assert settings.app_id == "app-id"
    assert settings.callback_url == "https://bot.example.test/api/calls"


@pytest.mark.parametrize(
    "public_url",
    [
        "https://bot.example.test /",
        "https://bot.example.test?x=1",
        "https://bot.example.test/#top",
        # Empty, but a callbackUri after them is a query or a fragment, not a path.
        "https://bot.example.test/?",
        "https://bot.example.test/bot#",
        "https://bot.example.test:99999",
        "https:///api",
    ],
)
def test_a_public_url_that_makes_no_callback_uri_is_refused(public_url: str) -> None:
    with pytest.raises(ConfigurationError, match="public_url"):
        Settings(public_url=public_url)


@pytest.mark.parametrize(
    ("name", "value"), [("log_level", "verbose"), ("log_format", "xml"), ("log_level", "")]
)
def test_an_unknown_log_setting_is_refused(name: str, value: str) -> None:
    changes: dict[str, Any] = {name: value}
    with pytest.raises(ConfigurationError, match=name):
        Settings(**changes)


@pytest.mark.parametrize("level", ["debug", "INFO", "Warning", "warn", "error", "critical"])
def test_every_level_logging_knows_is_taken(level: str) -> None:
    assert Settings(log_level=level).log_level == level


@pytest.mark.parametrize("value", [",", " , ", ",,,"])
def test_a_list_setting_that_names_nothing_is_refused(value: str) -> None:
    """Set to commas only, the tenant allow-list was empty: every tenant was allowed."""
    with pytest.raises(ConfigurationError, match=r"CALLBOT_ALLOWED_TENANTS.*lists nothing"):
        Settings.from_env({"CALLBOT_APP_ID": "a", "CALLBOT_ALLOWED_TENANTS": value})
    allowed = Settings.from_env({"CALLBOT_APP_ID": "a", "CALLBOT_ALLOWED_TENANTS": " t1, ,t2 "})
    assert allowed.allowed_tenants == frozenset({"t1", "t2"})


def test_the_longest_leeway_and_lease_are_taken() -> None:
    settings = Settings(token_leeway=300.0, store_lease=3600.0)
    assert (settings.token_leeway, settings.store_lease) == (300.0, 3600.0)


def test_a_keep_alive_interval_graph_would_not_wait_for_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="45 minutes"):
        Settings(keep_alive_interval=45 * 60.0)
    assert Settings(keep_alive_interval=40 * 60.0).keep_alive_interval == 2400.0


@pytest.mark.parametrize(
    ("name", "tiny", "shortest"),
    [
        ("key_refresh_interval", 1e-9, 60.0),
        ("keep_alive_interval", 0.001, 1.0),
        ("store_lease", 0.01, 1.0),
    ],
)
def test_a_duration_that_repeats_work_all_the_time_is_refused_below_its_minimum(
    name: str, tiny: float, shortest: float
) -> None:
    """Each of these repeats work for as long as the bot runs (fetching the signing keys, a
    keep-alive per call, a lease renewal in Redis): a tiny value was taken, and the bot
    hammered the key endpoint, Graph or Redis."""
    with pytest.raises(ConfigurationError) as refused:
        Settings().replace(**{name: tiny})
    message = str(refused.value)
    assert message.startswith(f"{name} must be at least {shortest:g} s, got {tiny!r}: ")
    assert message.endswith(f"(CALLBOT_{name.upper()})")
    with pytest.raises(ConfigurationError, match=f"{name} must be at least"):
        Settings.from_env({f"CALLBOT_{name.upper()}": str(tiny)})
    assert getattr(Settings().replace(**{name: shortest}), name) == shortest


def test_durations_a_test_shortens_stay_free_of_a_minimum() -> None:
    """Waits and windows repeat nothing on their own: short ones are a test's to choose."""
    short: dict[str, Any] = {
        "key_refetch_cooldown": 0.0,
        "reorder_window": 0.001,
        "termination_grace": 0.05,
        "pending_call_ttl": 0.2,
        "header_timeout": 0.1,
        "graph_retry_time": 0.0,
        "graph_request_timeout": 0.1,
        "answer_warning_after": 0.0,
        "shutdown_timeout": 0.0,
    }
    settings = Settings(**short)
    assert {name: getattr(settings, name) for name in short} == short


@pytest.mark.parametrize("name", ["graph_url", "authority_url", "openid_config_url"])
def test_the_urls_tokens_and_keys_travel_to_must_be_https(name: str) -> None:
    # Graph's gets the app token, the authority's the client secret, the OpenID
    # configuration's decides which tokens are believed: over plain http, anyone's on the way.
    env = "CALLBOT_" + name.upper()
    for bad in (
        "http://graph.microsoft.com/v1.0",
        "HTTP://login.microsoftonline.com",
        "http://127.0.0.2:8080",
        "graph.microsoft.com/v1.0",
        "ftp://graph.microsoft.com",
        "https://",
    ):
        with pytest.raises(ConfigurationError, match=f"{name} .*{env}"):
            Settings().replace(**{name: bad})
        with pytest.raises(ConfigurationError, match=env):
            Settings.from_env({env: bad})
    for good in (
        "https://graph.microsoft.us/v1.0",
        "https://127.0.0.2:8443",
        "http://127.0.0.1:8080/v1.0",
        "http://localhost:8080",
        "http://[::1]:8080",
    ):
        assert getattr(Settings().replace(**{name: good}), name) == good
