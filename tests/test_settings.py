"""Settings and tokens: parsing, safety checks, and the README table kept in step."""

from __future__ import annotations

from pathlib import Path

import pytest

from runbell.service.core.roles import Role, parse_tokens
from runbell.service.settings import SETTINGS_DOC, Settings, env_name, load_settings


def test_every_setting_is_in_the_readme_table():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for field, meaning in SETTINGS_DOC:
        assert f"| `{env_name(field)}` | {meaning} |" in readme
    assert {f for f, _ in SETTINGS_DOC} == set(Settings.model_fields)


def test_environment_then_flags():
    env = {"RUNBELL_PORT": "9000", "RUNBELL_NAMESPACE": "x", "RUNBELL_NO_AUTH": "yes", "RUNBELL_TOKENS": "a:read"}
    settings = load_settings({"port": 9100, "host": None}, env=env)
    assert (settings.port, settings.namespace, settings.no_auth, settings.host) == (9100, "x", True, "127.0.0.1")
    assert settings.tokens == {"a": Role.READ}


def test_tokens_parse_and_errors_never_echo_the_token():
    assert parse_tokens("t1:read, t2:admin,t:with:colon:publish") == {"t1": Role.READ, "t2": Role.ADMIN, "t:with:colon": Role.PUBLISH}
    with pytest.raises(ValueError) as bad_role:
        parse_tokens("s3cret:root")
    assert "s3cret" not in str(bad_role.value) and "read, publish, admin" in str(bad_role.value)
    with pytest.raises(ValueError):
        parse_tokens("no-role")


@pytest.mark.parametrize(
    "host, allowed", [("127.0.0.1", True), ("::1", True), ("localhost", True), ("0.0.0.0", False), ("10.0.0.5", False)]
)
def test_no_auth_only_on_loopback(host, allowed):
    settings = Settings(host=host, no_auth=True)
    if allowed:
        settings.check()
    else:
        with pytest.raises(ValueError, match="loopback"):
            settings.check()


def test_tokens_required_by_default():
    with pytest.raises(ValueError, match="RUNBELL_TOKENS"):
        Settings().check()


def test_webhook_schedule_is_checked():
    assert Settings(webhook_schedule="0, 1.5,60").webhook_schedule == "0, 1.5,60"
    for bad in ("", "5,-1", "soon"):
        with pytest.raises(ValueError, match="RUNBELL_WEBHOOK_SCHEDULE"):
            Settings(webhook_schedule=bad)
