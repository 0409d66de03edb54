"""deploy/helm/runbell, rendered by Helm's own engine (helm-python-sdk binds Helm 4's Go SDK, no
cluster or helm binary) and every manifest checked against the Kubernetes schemas (kubernetes-validate,
strict: unknown fields refused). Each topology of ci/ is rendered; the ServiceMonitor (a CRD the
schemas do not hold) is checked field by field."""

from __future__ import annotations

from pathlib import Path

import helm_python
import kubernetes_validate
import pytest
import yaml

from runbell.service.settings import ENV_ONLY, SETTINGS_DOC, env_name

CHART = Path(__file__).resolve().parent.parent / "deploy" / "helm" / "runbell"
KUBERNETES = "1.37"
TOPOLOGIES = sorted(p.name.removesuffix("-values.yaml") for p in (CHART / "ci").glob("*-values.yaml"))
SECRET_SETTINGS = {env_name(f) for f in ENV_ONLY} | {"RUNBELL_REDIS_URL", "RUNBELL_DATABASE_URL"}


def ci_values(topology: str) -> dict:
    return yaml.safe_load((CHART / "ci" / f"{topology}-values.yaml").read_text())


def render(values: dict) -> dict[str, dict]:
    """The chart's manifests for these values, by kind (each kind appears once in this chart)."""
    rendered = helm_python.Chart.load(CHART).render(values, name="rb", namespace="runbell")
    texts = [text for path, text in rendered.items() if path.endswith(".yaml")]  # not NOTES.txt
    manifests = [m for text in texts for m in yaml.safe_load_all(text) if m]
    by_kind = {m["kind"]: m for m in manifests}
    assert len(by_kind) == len(manifests), [m["kind"] for m in manifests]
    return by_kind


def gateway_container(manifests: dict[str, dict]) -> dict:
    [container] = manifests["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container["env"]}


def test_the_chart_lints_clean() -> None:
    report = helm_python.lint(CHART, ci_values("single"), strict=True)
    assert report["errors"] == [], report
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report


def test_each_ci_values_file_is_a_topology_tested_here() -> None:
    assert TOPOLOGIES == ["autoscaling", "cluster", "sentinel", "servicemonitor", "single"]


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_every_manifest_validates_against_the_kubernetes_schemas(topology: str) -> None:
    manifests = render(ci_values(topology))
    for kind, manifest in manifests.items():
        if kind == "ServiceMonitor":
            continue  # a CRD: test_the_service_monitor_scrapes_metrics_with_a_read_token
        kubernetes_validate.validate(manifest, KUBERNETES, strict=True)


def test_the_validator_refuses_a_broken_deployment() -> None:
    """kubernetes-validate is not a yes-sayer: replicas as a string, an unknown field."""
    deployment = render(ci_values("single"))["Deployment"]
    deployment["spec"]["replicas"] = "2"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES, strict=True)
    deployment = render(ci_values("single"))["Deployment"]
    gateway_container({"Deployment": deployment})["livenessProbe"]["httpGet"]["paht"] = "/healthz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES, strict=True)


def test_defaults_alone_refuse_to_render_without_the_secrets() -> None:
    """No Secret named and no values for one: the chart says what is missing, instead of pods that crash."""
    with pytest.raises(helm_python.HelmRenderError, match=r"secret\.existingSecret.*secret\.values\.tokens"):
        render({})


def test_default_values_with_an_existing_secret() -> None:
    manifests = render({"secret": {"existingSecret": "runbell-secrets"}})
    assert sorted(manifests) == ["Deployment", "PodDisruptionBudget", "Service", "ServiceAccount"]
    for manifest in manifests.values():
        kubernetes_validate.validate(manifest, KUBERNETES, strict=True)
    deployment = manifests["Deployment"]
    assert deployment["spec"]["replicas"] == 2
    refs = {e["valueFrom"]["secretKeyRef"]["name"] for e in gateway_container(manifests)["env"] if "valueFrom" in e}
    assert refs == {"runbell-secrets"}


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_the_gateway_runs_as_it_must(topology: str) -> None:
    manifests = render(ci_values(topology))
    pod = manifests["Deployment"]["spec"]["template"]["spec"]
    container = gateway_container(manifests)
    # probes: alive is /healthz, ready is /readyz (Redis, the store, the pub/sub listener)
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert container["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    # not root, nothing writable but its volumes
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    env = env_of(container)
    assert env["RUNBELL_HOST"]["value"] == "0.0.0.0" and env["RUNBELL_PORT"]["value"] == "8080"
    spool = env["RUNBELL_SPOOL_DIR"]["value"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert mounts.get("/var/lib/runbell") == "spool" and spool.startswith("/var/lib/runbell/")
    # secrets only by reference, never as values in the pod spec
    for name in SECRET_SETTINGS:
        assert "value" not in env[name] and env[name]["valueFrom"]["secretKeyRef"]["name"], name
    # a PodDisruptionBudget over the same pods
    pdb = manifests["PodDisruptionBudget"]
    assert pdb["spec"]["selector"]["matchLabels"] == manifests["Deployment"]["spec"]["selector"]["matchLabels"]
    assert manifests["Service"]["spec"]["selector"] == manifests["Deployment"]["spec"]["selector"]["matchLabels"]


def test_a_chart_made_secret_holds_the_values_and_the_pods_roll_when_they_change() -> None:
    values = ci_values("sentinel")
    manifests = render(values)
    secret = manifests["Secret"]
    keys = secret["stringData"]
    assert keys["redis-url"].startswith("redis+sentinel://") and keys["airflow-password"] == "airflow-secret"
    assert "airflow-token" not in keys  # not given: the pod's reference to it is optional
    env = env_of(gateway_container(manifests))
    assert env["RUNBELL_AIRFLOW_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert {env[n]["valueFrom"]["secretKeyRef"]["name"] for n in SECRET_SETTINGS} == {secret["metadata"]["name"]}
    before = manifests["Deployment"]["spec"]["template"]["metadata"]["annotations"]["checksum/secret"]
    values["secret"]["values"]["tokens"] = "another:admin"
    after = render(values)["Deployment"]["spec"]["template"]["metadata"]["annotations"]["checksum/secret"]
    assert before != after


@pytest.mark.parametrize(
    ("topology", "scheme"),
    [("single", "redis://"), ("sentinel", "redis+sentinel://")],
)
def test_the_redis_url_is_passed_through_as_given(topology: str, scheme: str) -> None:
    url = ci_values(topology)["secret"]["values"]["redisUrl"]
    assert url.startswith(scheme)
    assert render(ci_values(topology))["Secret"]["stringData"]["redis-url"] == url


def test_the_three_redis_url_shapes_are_documented_in_values() -> None:
    text = (CHART / "values.yaml").read_text()
    for shape in ("redis://runbell-gateway:", "redis+cluster://runbell-gateway:", "redis+sentinel://runbell-gateway:"):
        assert shape in text, shape
    assert "redis+cluster://" in (CHART / "ci" / "cluster-values.yaml").read_text()


def test_the_hpa_exists_only_when_enabled_and_then_owns_the_replicas() -> None:
    off = render(ci_values("single"))
    assert "HorizontalPodAutoscaler" not in off and off["Deployment"]["spec"]["replicas"] == 2
    on = render(ci_values("autoscaling"))
    hpa = on["HorizontalPodAutoscaler"]
    assert "replicas" not in on["Deployment"]["spec"]  # else each upgrade would undo the autoscaler's count
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": on["Deployment"]["metadata"]["name"]}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 6)


def test_the_pdb_can_be_turned_off() -> None:
    values = ci_values("single") | {"podDisruptionBudget": {"enabled": False}}
    assert "PodDisruptionBudget" not in render(values)


def test_the_service_monitor_scrapes_metrics_with_a_read_token() -> None:
    assert "ServiceMonitor" not in render(ci_values("single"))
    manifests = render(ci_values("servicemonitor"))
    monitor = manifests["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert set(monitor["spec"]["selector"]["matchLabels"].items()) <= set(manifests["Service"]["metadata"]["labels"].items())
    [endpoint] = monitor["spec"]["endpoints"]
    assert (endpoint["port"], endpoint["path"]) == ("http", "/metrics")
    assert endpoint["port"] in {p["name"] for p in manifests["Service"]["spec"]["ports"]}
    assert endpoint["authorization"] == {"type": "Bearer", "credentials": {"name": "runbell-secrets", "key": "metrics-token"}}
    values = ci_values("servicemonitor")
    values["serviceMonitor"]["tokenSecret"]["name"] = ""
    with pytest.raises(helm_python.HelmRenderError, match="read token"):
        render(values)


def test_config_takes_real_gateway_settings_and_refuses_secrets_in_it() -> None:
    """Every key of config is a setting of service/settings.py; a secret given there is refused, so it
    cannot end up as a plain value in the pod spec."""
    settings = {env_name(field) for field, _ in SETTINGS_DOC}
    config = yaml.safe_load((CHART / "values.yaml").read_text())["config"]
    assert config and set(config) <= settings - SECRET_SETTINGS, set(config) - settings
    for name in sorted(SECRET_SETTINGS | {"RUNBELL_HOST", "RUNBELL_PORT", "RUNBELL_SPOOL_DIR"}):
        values = ci_values("single") | {"config": {name: "x"}}
        with pytest.raises(helm_python.HelmRenderError, match=f"config.{name}: set by the chart or read from the Secret"):
            render(values)
    with pytest.raises(helm_python.HelmRenderError, match="RUNBELL_\\* settings only"):
        render(ci_values("single") | {"config": {"REDIS_URL": "redis://x"}})


def test_every_secret_setting_of_the_gateway_comes_from_the_secret() -> None:
    """A secret setting added to service/settings.py (ENV_ONLY) without a Secret key in the chart fails this."""
    env = env_of(gateway_container(render(ci_values("single"))))
    assert SECRET_SETTINGS <= {n for n, e in env.items() if "valueFrom" in e}


AIRFLOW_VALUES = CHART.parent.parent / "airflow-helm-values.yaml"


def test_the_airflow_chart_values_give_every_component_the_hook_and_its_redis() -> None:
    """deploy/airflow-helm-values.yaml, for the official Airflow chart. Its values.schema.json is in no
    registry package reachable here (only in Airflow's source repository), so the names are checked
    against the chart's documented shapes: `secret` [{envName, secretName, secretKey}], `env`
    [{name, value}], `images.airflow.{repository, tag}`, `airflowVersion`."""
    from runbell.listeners.config import HOOK_SETTINGS_DOC

    values = yaml.safe_load(AIRFLOW_VALUES.read_text())
    assert set(values) == {"airflowVersion", "images", "secret", "env"}
    dockerfile = (CHART.parent.parent / "airflow" / "Dockerfile").read_text()
    assert f"ARG AIRFLOW_VERSION={values['airflowVersion']}\n" in dockerfile
    assert set(values["images"]["airflow"]) == {"repository", "tag", "pullPolicy"}
    assert values["images"]["airflow"]["tag"].startswith(values["airflowVersion"])
    assert values["secret"] == [{"envName": "RUNBELL_REDIS_URL", "secretName": "runbell-hook", "secretKey": "redis-url"}]
    hook_settings = {name for name, _ in HOOK_SETTINGS_DOC}
    assert all(set(e) == {"name", "value"} and isinstance(e["value"], str) for e in values["env"])
    assert {e["name"] for e in values["env"]} <= hook_settings - {"RUNBELL_REDIS_URL"}  # the URL only from the Secret


def test_the_airflow_values_alternative_installs_the_hook_at_start() -> None:
    """The commented `_PIP_ADDITIONAL_REQUIREMENTS` block is valid YAML of the same shape once uncommented."""
    lines = AIRFLOW_VALUES.read_text().splitlines()
    start = lines.index("# env:")
    block = []
    for line in lines[start:]:
        if not line.startswith("# ") or line.startswith("# 2."):
            break
        block.append(line[2:])
    env = yaml.safe_load("\n".join(block))["env"]
    assert env[0]["name"] == "_PIP_ADDITIONAL_REQUIREMENTS" and env[0]["value"].startswith("runbell")
    assert "[" not in env[0]["value"].split("@")[0]  # the base install (the hook), no gateway extra


@pytest.mark.parametrize("topology", ["single", "sentinel"])
def test_the_pods_environment_is_settings_the_gateway_accepts(topology: str) -> None:
    """The Deployment's env, with the chart-made Secret's keys put in, loads as the gateway's settings
    and passes the checks `runbell serve` makes at start (a bad value under config fails here)."""
    from runbell.service.settings import load_settings

    manifests = render(ci_values(topology))
    secret = manifests["Secret"]["stringData"]
    env: dict[str, str] = {}
    for name, entry in env_of(gateway_container(manifests)).items():
        if "value" in entry:
            env[name] = entry["value"]
        elif entry["valueFrom"]["secretKeyRef"]["key"] in secret:
            env[name] = secret[entry["valueFrom"]["secretKeyRef"]["key"]]
        else:
            assert entry["valueFrom"]["secretKeyRef"].get("optional") is True, name
    settings = load_settings(env=env)
    settings.check()
    assert (settings.host, settings.port, settings.redis_url) == ("0.0.0.0", 8080, ci_values(topology)["secret"]["values"]["redisUrl"])
    assert settings.database_url.startswith("postgresql://") and settings.tokens
    bad = ci_values(topology) | {"config": {"RUNBELL_MAX_SUBSCRIBERS": "many"}}
    env["RUNBELL_MAX_SUBSCRIBERS"] = env_of(gateway_container(render(bad)))["RUNBELL_MAX_SUBSCRIBERS"]["value"]
    with pytest.raises(ValueError, match="max_subscribers"):
        load_settings(env=env)
