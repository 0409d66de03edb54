"""deploy/compose.yaml, checked without Docker: against the Compose Specification (compose-spec, the
Rust compose_spec parser: unknown keys, bad types, durations and undefined secrets are refused), then
for what the stack needs (health conditions, secrets as files, a spool per gateway, HAProxy in front of
every gateway). The scripts it runs are run here: deploy/compose-secrets writes the secret files,
deploy/redis/entrypoint renders the ACL from them for a real redis-server, and the gateway image's
entrypoint turns RUNBELL_<NAME>_FILE into RUNBELL_<NAME>."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import redis
import yaml
from compose_spec import PyOptions

from runbell.service.core.roles import parse_tokens
from tests.conftest import free_port

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
REDIS_CLI = shutil.which("redis-cli") or "/usr/bin/redis-cli"
GATEWAYS = ["gateway-1", "gateway-2"]


def validated(text: str) -> dict:
    """The file as written (YAML merge keys applied), once the Compose Specification accepts it; else ValueError."""
    compose = PyOptions(apply_merge=True).from_yaml(text)
    compose.validate()
    return yaml.safe_load(text)


@pytest.fixture(scope="module")
def stack() -> dict:
    return validated(COMPOSE.read_text())


def test_the_compose_file_follows_the_compose_specification(stack: dict) -> None:
    assert sorted(stack["services"]) == sorted(["redis", "postgres", *GATEWAYS, "lb"])


@pytest.mark.parametrize(
    ("before", "after", "complaint"),
    [
        ("retries: 5\n\n  postgres", "retries: five\n\n  postgres", "expected u64"),
        ("  postgres:\n    image:", "  postgres:\n    imagee:", "imagee"),
        ("condition: service_healthy", "condition: service_ready", "service_ready"),
        ("interval: 5s", "interval: 5 seconds", "duration"),
        ("      - postgres_password\n    volumes", "      - postgres_pasword\n    volumes", "postgres_pasword"),
    ],
)
def test_the_validator_refuses_a_broken_compose_file(before: str, after: str, complaint: str) -> None:
    text = COMPOSE.read_text()
    assert before in text
    with pytest.raises(ValueError, match=complaint):
        validated(text.replace(before, after, 1))


def test_every_service_waits_for_what_it_needs_to_be_healthy(stack: dict) -> None:
    services = stack["services"]
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        for needed, how in service.get("depends_on", {}).items():
            assert needed in services, f"{name} depends on {needed}, which is no service"  # the validator lets this pass
            assert how["condition"] == "service_healthy", (name, needed)
            assert services[needed].get("healthcheck"), needed
    for gateway in GATEWAYS:
        assert set(services[gateway]["depends_on"]) == {"redis", "postgres"}
        assert "/readyz" in " ".join(services[gateway]["healthcheck"]["test"])  # ready, not only alive, before the LB sends
    assert set(services["lb"]["depends_on"]) == set(GATEWAYS)


def test_secrets_are_files_never_values(stack: dict, tmp_path: Path) -> None:
    services = stack["services"]
    written = set(compose_secrets(tmp_path / "secrets"))
    for name, secret in stack["secrets"].items():
        assert secret["file"] == f"./secrets/{name}", name
        assert name in written, f"deploy/compose-secrets does not write {name}"
    for name, service in services.items():
        for key, value in (service.get("environment") or {}).items():
            if key.endswith("_FILE"):
                assert value.startswith("/run/secrets/") and value.removeprefix("/run/secrets/") in service["secrets"], (name, key)
            else:
                assert not re.search(r"TOKEN|SECRET|PASSWORD|_URL$", key), f"{name}: {key} given as a value"
    gateway_env = services["gateway-1"]["environment"]
    for setting in ("RUNBELL_TOKENS", "RUNBELL_TOKEN_SECRET", "RUNBELL_REDIS_URL", "RUNBELL_DATABASE_URL"):
        assert f"{setting}_FILE" in gateway_env, setting
    assert (DEPLOY / ".gitignore").read_text().split() == ["secrets/"]


def test_each_gateway_keeps_its_own_spool(stack: dict) -> None:
    spools = []
    for gateway in GATEWAYS:
        service = stack["services"][gateway]
        [source] = [v.split(":")[0] for v in service["volumes"] if v.split(":")[1] == "/var/lib/runbell"]
        assert source in stack["volumes"]  # a named volume, outliving the container
        spools.append(source)
    assert len(set(spools)) == len(GATEWAYS)
    dockerfile = (DEPLOY / "gateway" / "Dockerfile").read_text()
    assert "RUNBELL_SPOOL_DIR=/var/lib/runbell/spool" in dockerfile and 'VOLUME ["/var/lib/runbell"]' in dockerfile


def test_haproxy_sends_to_every_gateway_that_is_ready(stack: dict) -> None:
    config = (DEPLOY / "haproxy" / "haproxy.cfg").read_text()
    servers = re.findall(r"^\s*server (\S+) (\S+):8080\s*$", config, re.M)
    assert servers == [(g, g) for g in GATEWAYS]
    assert "option httpchk GET /readyz" in config and "balance leastconn" in config
    # longer than the longest long-poll (60 s) and than the SSE heartbeat (15 s)
    assert int(re.search(r"timeout server (\d+)s", config)[1]) > 60 and int(re.search(r"timeout client (\d+)s", config)[1]) > 60
    assert "%HPO" in config and "httplog" not in config  # logs the path, never a query string's access_token
    lb = stack["services"]["lb"]
    # HAProxy refuses to start when it cannot have two descriptors a connection (found by running it)
    assert lb["ulimits"]["nofile"]["hard"] > 2 * int(re.search(r"maxconn (\d+)", config)[1])
    assert lb["volumes"] == ["./haproxy/haproxy.cfg:/usr/local/etc/haproxy/haproxy.cfg:ro"]


def compose_secrets(folder: Path) -> dict[str, str]:
    subprocess.run([DEPLOY / "compose-secrets", folder], check=True, capture_output=True, timeout=30)
    return {p.name: p.read_text() for p in folder.iterdir()}


def test_compose_secrets_writes_matching_secrets_and_keeps_them(tmp_path: Path) -> None:
    folder = tmp_path / "secrets"
    first = compose_secrets(folder)
    assert all(value.endswith("\n") and value.strip() for value in first.values())
    secrets = {name: value.strip() for name, value in first.items()}
    gateway_pw, hook_pw, pg_pw = secrets["redis_gateway_password"], secrets["redis_hook_password"], secrets["postgres_password"]
    assert len({gateway_pw, hook_pw, pg_pw}) == 3 and all(re.fullmatch(r"[0-9a-f]{48}", p) for p in (gateway_pw, hook_pw, pg_pw))
    assert secrets["gateway_redis_url"] == f"redis://runbell-gateway:{gateway_pw}@redis:6379/0"
    assert secrets["hook_redis_url"] == f"redis://runbell-hook:{hook_pw}@redis:6379/0"
    assert secrets["gateway_database_url"] == f"postgresql://runbell:{pg_pw}@postgres:5432/runbell"
    assert len(secrets["runbell_token_secret"].encode()) >= 32  # the gateway refuses a shorter one
    assert sorted(grant.role.value for grant in parse_tokens(secrets["runbell_tokens"]).values()) == ["admin", "read"]
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    (folder / "redis_gateway_password").write_text("changed\n")
    again = compose_secrets(folder)
    assert again["runbell_tokens"] == first["runbell_tokens"] and again["postgres_password"] == first["postgres_password"]
    assert again["gateway_redis_url"] == "redis://runbell-gateway:changed@redis:6379/0\n"  # URLs follow the passwords


@pytest.fixture
def compose_redis(tmp_path: Path):
    """deploy/redis/entrypoint as Compose runs it, with the secrets of deploy/compose-secrets, starting a
    real redis-server of this test's own on a free port (the command after the entrypoint)."""
    if not (os.path.exists(REDIS_SERVER) and os.path.exists(REDIS_CLI)):
        pytest.fail("redis-server and redis-cli are needed to test the compose stack's Redis", pytrace=False)
    secrets = tmp_path / "secrets"
    compose_secrets(secrets)
    port = free_port()
    env = {
        **os.environ,
        "RUNBELL_SECRETS_DIR": str(secrets),
        "RUNBELL_ACL_TEMPLATE": str(DEPLOY / "redis" / "users.acl"),
        "RUNBELL_ACL_FILE": str(tmp_path / "users.acl"),
    }
    argv = [DEPLOY / "redis" / "entrypoint", REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # execs redis-server
    try:
        yield port, secrets, process
    finally:
        process.terminate()  # by its PID: this test's server only
        process.wait(10)


def at(url_file: Path, port: int) -> str:
    """A URL of the secrets, pointed at the test's server instead of the compose service "redis"."""
    return url_file.read_text().strip().replace("@redis:6379/", f"@127.0.0.1:{port}/")


def test_the_stacks_redis_lets_in_the_users_of_the_secrets_only(compose_redis) -> None:
    port, secrets, process = compose_redis
    gateway = redis.Redis.from_url(at(secrets / "gateway_redis_url", port))
    for _ in range(200):
        try:
            assert gateway.ping()
            break
        except redis.ConnectionError:
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            subprocess.run(["sleep", "0.05"])
    assert gateway.xrange("runbell:events") == []  # the gateway's user reads the logs
    hook = redis.Redis.from_url(at(secrets / "hook_redis_url", port))
    assert hook.ping()
    with pytest.raises(redis.exceptions.NoPermissionError):
        hook.xrange("runbell:events")  # the hook's user reads no log
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(port=port).get("runbell:x")  # the default user is off
    wrong = at(secrets / "gateway_redis_url", port).replace(":" + (secrets / "redis_gateway_password").read_text().strip() + "@", ":nope@")
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(wrong).ping()
    for client in (gateway, hook):
        client.close()


def test_the_stacks_redis_healthcheck_passes_against_it_and_fails_with_a_wrong_password(compose_redis, stack: dict) -> None:
    port, secrets, _ = compose_redis
    test = stack["services"]["redis"]["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"
    command = test[1].replace("$$", "$").replace("/run/secrets/", f"{secrets}/").replace("redis-cli ", f"{REDIS_CLI} -p {port} ", 1)
    for _ in range(200):
        if subprocess.run(["sh", "-c", command], capture_output=True, timeout=10).returncode == 0:
            break
        subprocess.run(["sleep", "0.05"])
    else:
        pytest.fail("the healthcheck never passed")
    (secrets / "redis_gateway_password").write_text("wrong\n")
    assert subprocess.run(["sh", "-c", command], capture_output=True, timeout=10).returncode != 0


FAKE_RUNBELL = """#!/bin/sh
echo "args: $*"
env | grep '^RUNBELL_' | sort
"""


def entrypoint(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """The gateway image's entrypoint, with a runbell that prints its arguments and RUNBELL_* variables."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "runbell"
    fake.write_text(FAKE_RUNBELL)
    fake.chmod(0o755)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RUNBELL_")}
    return subprocess.run(
        [DEPLOY / "gateway" / "entrypoint", "--log-level", "info"],
        env=clean | {"PATH": f"{bin_dir}:/usr/bin:/bin"} | env,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_the_gateway_entrypoint_reads_secrets_from_files(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("abc:admin,def:read\n")
    url = tmp_path / "url"
    url.write_text("redis://runbell-gateway:p%40ss@redis:6379/0")
    done = entrypoint(tmp_path, RUNBELL_TOKENS_FILE=str(tokens), RUNBELL_REDIS_URL_FILE=str(url), RUNBELL_LOG_LEVEL="info")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "args: serve --log-level info",
        "RUNBELL_LOG_LEVEL=info",
        "RUNBELL_REDIS_URL=redis://runbell-gateway:p%40ss@redis:6379/0",
        "RUNBELL_TOKENS=abc:admin,def:read",
    ]


def test_the_gateway_entrypoint_refuses_a_setting_given_twice_or_an_unreadable_file(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("abc:admin")
    done = entrypoint(tmp_path, RUNBELL_TOKENS_FILE=str(tokens), RUNBELL_TOKENS="other:admin")
    assert done.returncode == 64 and "both RUNBELL_TOKENS and RUNBELL_TOKENS_FILE" in done.stderr and "abc" not in done.stderr
    done = entrypoint(tmp_path, RUNBELL_TOKENS_FILE=str(tmp_path / "missing"))
    assert done.returncode == 64 and "cannot be read" in done.stderr and done.stdout == ""


def test_the_images_hold_no_secret_and_run_as_no_root() -> None:
    gateway = (DEPLOY / "gateway" / "Dockerfile").read_text()
    assert re.search(r"^USER 10001:10001$", gateway, re.M) and re.search(r"^HEALTHCHECK .*\n.*/healthz", gateway, re.M)
    assert re.search(r"^EXPOSE 8080$", gateway, re.M) and "'.[gateway]'" in gateway
    assert not re.search(r"(TOKEN|SECRET|PASSWORD|REDIS_URL|DATABASE_URL)\S*=", gateway)
    airflow = (DEPLOY / "airflow" / "Dockerfile").read_text()
    assert re.search(r"^ARG AIRFLOW_VERSION=3\.3\.2$", airflow, re.M) and "FROM apache/airflow:${AIRFLOW_VERSION}" in airflow
    # the hook is the base install: no extra, so none of the gateway's dependencies
    assert re.search(r'pip install --no-cache-dir "apache-airflow==\$\{AIRFLOW_VERSION\}" /tmp/runbell\b(?!\[)', airflow)


def test_a_compose_gateways_environment_is_settings_the_gateway_accepts(stack: dict, tmp_path: Path) -> None:
    """The image's ENV, the compose file's environment and the secret files of deploy/compose-secrets,
    through the entrypoint: the settings `runbell serve` gets load and pass its start-up checks."""
    from runbell.service.settings import load_settings

    secrets = tmp_path / "secrets"
    compose_secrets(secrets)
    dockerfile = (DEPLOY / "gateway" / "Dockerfile").read_text()
    image_env = dict(re.findall(r"(RUNBELL_[A-Z_]+)=(\S+)", dockerfile))
    service_env = {k: v.replace("/run/secrets/", f"{secrets}/") for k, v in stack["services"]["gateway-1"]["environment"].items()}
    done = entrypoint(tmp_path, **image_env, **service_env)
    assert done.returncode == 0, done.stderr
    env = dict(line.split("=", 1) for line in done.stdout.splitlines()[1:])
    assert not any(name.endswith("_FILE") for name in env)
    settings = load_settings(env=env)
    settings.check()
    assert (settings.host, settings.port) == ("0.0.0.0", 8080) and settings.token_secret is not None
    assert settings.redis_url == (secrets / "gateway_redis_url").read_text().strip()
    assert settings.database_url == (secrets / "gateway_database_url").read_text().strip()
