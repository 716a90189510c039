"""The deployment files: Kubernetes manifests rendered with kustomize and validated
offline against the Kubernetes schemas, the Prometheus configs and alert rules
checked and unit-tested with promtool, the compose stack's wiring. (No cluster or
Docker engine runs here: what a cluster would do beyond the schemas is not tested.)"""

from __future__ import annotations

import asyncio
import base64
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import latest_version

from router.config import Config, parse_config
from tests.conftest import MakeRouter, MakeSim, RedisServer, StartPrometheus, node_entry

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
ENV = {"BALLAST_JOIN_TOKEN": "j", "BALLAST_ADMIN_TOKEN": "a"}
SECRETS = {"admin-token": "a" * 48, "join-token": "j" * 48}  # what secrets.env would hold
PRESTOP_S = 5  # the preStop sleep of deploy/k8s/base/deployment.yaml


def tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} missing: the test command installs it (see .ci/test)"
    return path


def kustomize(overlay: str, secrets: dict[str, str] | None) -> subprocess.CompletedProcess[str]:
    """``kubectl kustomize`` on a copy of deploy/k8s with ``secrets`` written to
    base/secrets.env (an operator's own file there is left out)."""
    with tempfile.TemporaryDirectory() as tmp:
        k8s = Path(tmp) / "k8s"
        shutil.copytree(DEPLOY / "k8s", k8s, ignore=shutil.ignore_patterns("secrets.env"))
        if secrets is not None:
            lines = "".join(f"{k}={v}\n" for k, v in secrets.items())
            (k8s / "base/secrets.env").write_text(lines)
        return subprocess.run(
            [tool("kubectl"), "kustomize", str(k8s / "overlays" / overlay)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip


def render(overlay: str) -> list[dict[str, Any]]:
    out = kustomize(overlay, SECRETS)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def router_config(objects: list[dict[str, Any]]) -> Config:
    cm = next(o for o in of_kind(objects, "ConfigMap") if "ballast.yaml" in o["data"])
    return parse_config(yaml.safe_load(cm["data"]["ballast.yaml"]), env=ENV)


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


@pytest.mark.parametrize("overlay", ["single", "ha"])
def test_overlay_renders_and_validates(overlay: str) -> None:
    objects = render(overlay)
    version = latest_version()
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)  # raises on any error
    deployment = next(
        o for o in of_kind(objects, "Deployment") if o["metadata"]["name"] == "ballast"
    )
    pod = deployment["spec"]["template"]["spec"]
    (router,) = [c for c in pod["containers"] if c["name"] == "ballast"]
    cfg = router_config(objects)

    # The config mounted is the one the manifests are sized for.
    assert router["image"].endswith(":0.1.0") and "latest" not in router["image"]
    assert router["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert router["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert router["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(PRESTOP_S)]
    grace = pod["terminationGracePeriodSeconds"]
    assert grace >= PRESTOP_S + cfg.shutdown.grace_s + cfg.shutdown.drain_s + 5
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert router["securityContext"]["readOnlyRootFilesystem"] is True
    assert router["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert "cpu" in router["resources"]["requests"] and "memory" in router["resources"]["limits"]
    assert cfg.listen.port == router["ports"][0]["containerPort"]

    # Services select the router pods; the secrets the pods read exist.
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    services = {s["metadata"]["name"]: s for s in of_kind(objects, "Service")}
    for name in ("ballast", "ballast-pods"):
        assert services[name]["spec"]["selector"].items() <= labels.items()
    assert services["ballast-pods"]["spec"]["publishNotReadyAddresses"] is True
    secrets = {s["metadata"]["name"]: s for s in of_kind(objects, "Secret")}
    for env in router["env"]:
        ref = env["valueFrom"]["secretKeyRef"]
        value = base64.b64decode(secrets[ref["name"]]["data"][ref["key"]]).decode()
        assert value == SECRETS[ref["key"]]  # from secrets.env, nothing else
    assert all("stringData" not in s for s in secrets.values())
    mounted = {v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v}
    configs = [m for m in of_kind(objects, "ConfigMap") if "ballast.yaml" in m["data"]]
    assert mounted == {m["metadata"]["name"] for m in configs}

    # Replicas spread over nodes, a rolling update's new pods counted apart.
    assert spread_by_node(pod, labels)

    if overlay == "single":
        assert deployment["spec"]["replicas"] == 1
        assert cfg.state.redis_url is None  # the embedded store: one replica
        assert not of_kind(objects, "HorizontalPodAutoscaler")
    else:
        assert deployment["spec"]["replicas"] == 3
        assert cfg.state.redis_url is None and cfg.state.sentinel is not None  # see below
        (hpa,) = of_kind(objects, "HorizontalPodAutoscaler")
        assert hpa["spec"]["scaleTargetRef"]["name"] == "ballast"
        assert hpa["spec"]["minReplicas"] == 3
        assert [p["spec"]["maxUnavailable"] for p in budgets_of(objects, labels)] == [1]


def spread_by_node(pod: dict[str, Any], labels: dict[str, str]) -> bool:
    """A hard spread over nodes of the pods with these labels."""
    return any(
        c["topologyKey"] == "kubernetes.io/hostname"
        and c["whenUnsatisfiable"] == "DoNotSchedule"
        and c["maxSkew"] == 1
        and c["labelSelector"]["matchLabels"].items() <= labels.items()
        for c in pod.get("topologySpreadConstraints", [])
    )


def budgets_of(objects: list[dict[str, Any]], labels: dict[str, str]) -> list[dict[str, Any]]:
    """The PodDisruptionBudgets covering pods with these labels."""
    return [
        p
        for p in of_kind(objects, "PodDisruptionBudget")
        if p["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ]


def script_defaults(script: str) -> dict[str, str]:
    """``NAME=${NAME:-default}`` lines of a shell script."""
    found = re.findall(r'^(\w+)=\$\{\1:-"?([^"}]*)"?\}', script, re.M)
    return dict(found)


def test_secrets_are_never_committed_the_render_fails_until_they_are_set() -> None:
    base = DEPLOY / "k8s/base"
    for overlay in ("single", "ha"):
        out = kustomize(overlay, None)
        assert out.returncode != 0 and "secrets.env" in out.stderr
    assert "secrets.env" in (base / ".gitignore").read_text().split()
    example = (base / "secrets.env.example").read_text()
    keys = dict(line.split("=", 1) for line in example.splitlines() if "=" in line)
    assert keys == dict.fromkeys(SECRETS, "")  # the names, no usable value
    for path in (DEPLOY / "k8s").rglob("*.yaml"):
        assert "stringData" not in path.read_text(), path


def test_ha_redis_runs_behind_sentinel_with_persistence_budgets_and_spread() -> None:
    objects = render("ha")
    cfg = router_config(objects)
    assert cfg.state.sentinel is not None
    sets = {s["metadata"]["name"]: s for s in of_kind(objects, "StatefulSet")}
    services = {s["metadata"]["name"]: s for s in of_kind(objects, "Service")}
    (scripts,) = [m for m in of_kind(objects, "ConfigMap") if "redis-ha.sh" in m["data"]]
    script = scripts["data"]["redis-ha.sh"]
    assert script == (DEPLOY / "k8s/overlays/ha/redis-ha.sh").read_text()
    defaults = script_defaults(script)

    def pods_of(name: str, role: str) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
        """The StatefulSet's pod spec, its one container, and its pods' host:port."""
        sts = sets[name]
        pod = sts["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        # Started by the overlay's script in this role, with the script mounted.
        assert container["command"] == ["sh", "/scripts/redis-ha.sh", role]
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/scripts"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        assert volume["configMap"]["name"] == scripts["metadata"]["name"]
        # A headless Service names every pod, ready or not (Sentinel announces names).
        svc = services[sts["spec"]["serviceName"]]
        assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"]
        labels = sts["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= labels.items()
        (port,) = container["ports"]
        assert [p["targetPort"] for p in svc["spec"]["ports"]] == [port["name"]]
        assert [p["port"] for p in svc["spec"]["ports"]] == [port["containerPort"]]
        # Three, spread over nodes, one at a time in a drain.
        assert sts["spec"]["replicas"] == 3
        assert spread_by_node(pod, labels)
        assert [p["spec"]["maxUnavailable"] for p in budgets_of(objects, labels)] == [1]
        names = [f"{name}-{i}.{svc['metadata']['name']}" for i in range(3)]
        return pod, container, [f"{n}:{port['containerPort']}" for n in names]

    redis_pod, redis, redis_hosts = pods_of("ballast-redis", "redis")
    sentinel_pod, sentinel, sentinel_hosts = pods_of("ballast-sentinel", "sentinel")

    # The script's defaults are the manifests' names; the routers use those sentinels.
    assert defaults["REDIS_HOSTS"].split() == redis_hosts
    assert defaults["SENTINEL_HOSTS"].split() == sentinel_hosts
    assert cfg.state.sentinel.hosts == sentinel_hosts
    assert cfg.state.sentinel.service == defaults["SERVICE"]
    # A quorum the sentinels still have with one of them away (their budget).
    assert 3 // 2 + 1 <= int(defaults["QUORUM"]) <= 3 - 1

    # Redis: AOF fsynced every second, on a PersistentVolumeClaim per pod.
    assert "--appendonly yes --appendfsync everysec" in script
    (claim,) = sets["ballast-redis"]["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["spec"]["resources"]["requests"]["storage"]
    (data,) = [m for m in redis["volumeMounts"] if m["name"] == claim["metadata"]["name"]]
    assert data["mountPath"] == defaults["DATA_DIR"]
    assert redis_pod["securityContext"]["fsGroup"] == redis_pod["securityContext"]["runAsUser"]
    # Sentinel rewrites its config: a writable volume where the script puts it.
    (conf,) = [m for m in sentinel["volumeMounts"] if m["mountPath"] == defaults["CONF_DIR"]]
    assert any(v["name"] == conf["name"] and "emptyDir" in v for v in sentinel_pod["volumes"])
    for container in (redis, sentinel):
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert "memory" in container["resources"]["limits"]

    # Only the routers, Redis and the sentinels reach Redis and the sentinels.
    (policy,) = of_kind(objects, "NetworkPolicy")
    (rule,) = policy["spec"]["ingress"]
    (peer,) = rule["from"]
    (allowed,) = peer["podSelector"]["matchExpressions"]
    assert set(allowed["values"]) == {"ballast", "ballast-redis", "ballast-sentinel"}
    (guarded,) = policy["spec"]["podSelector"]["matchExpressions"]
    assert set(guarded["values"]) == {"ballast-redis", "ballast-sentinel"}


def test_single_keeps_keys_and_usage_on_a_volume() -> None:
    objects = render("single")
    assert router_config(objects).state.path == "/var/lib/ballast/state.db"
    (claim,) = of_kind(objects, "PersistentVolumeClaim")
    (deployment,) = of_kind(objects, "Deployment")
    spec = deployment["spec"]
    assert spec["strategy"] == {"type": "Recreate"}  # one pod holds the volume at a time
    pod = spec["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["state"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["state"] == "/var/lib/ballast"


def test_prometheus_configs_and_rules_pass_promtool() -> None:
    promtool = tool("promtool")
    for config in ("prometheus.yml", "kubernetes.yml"):
        out = subprocess.run(
            [promtool, "check", "config", str(DEPLOY / "prometheus" / config)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr
        scrape = yaml.safe_load((DEPLOY / "prometheus" / config).read_text())["scrape_configs"]
        assert [job["job_name"] for job in scrape] == ["ballast"]  # what the alerts expect


def test_alert_rules_with_one_and_two_replicas() -> None:
    out = subprocess.run(
        [tool("promtool"), "test", "rules", str(DEPLOY / "prometheus/tests/alerts_test.yml")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout


def test_compose_replicas_share_redis_and_are_scraped() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    routers = [n for n, s in services.items() if s.get("command", [None])[0] == "serve"]
    assert sorted(routers) == ["ballast-a", "ballast-b"]
    mounts = {v.split(":")[0] for n in routers for v in services[n]["volumes"]}
    assert mounts == {"./compose/ballast.yaml"}
    cfg = parse_config(yaml.safe_load((DEPLOY / "compose/ballast.yaml").read_text()), env=ENV)
    assert cfg.state.redis_url == "redis://redis:6379/0" and "redis" in services
    redis_args = services["redis"]["command"]  # keys and usage outlive a Redis restart
    assert redis_args[redis_args.index("--appendonly") + 1] == "yes"
    assert any(v.endswith(":/data") for v in services["redis"]["volumes"])
    for node in cfg.nodes:
        assert node.id in services  # every node of the config is a service of the stack
    prometheus = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    targets = prometheus["scrape_configs"][0]["static_configs"][0]["targets"]
    assert targets == [f"{n}:{cfg.listen.port}" for n in routers]
    for service in ("prometheus", "grafana"):
        for volume in services[service]["volumes"]:
            assert (DEPLOY / volume.split(":")[0]).exists(), volume
    grace = int(services["ballast-a"]["stop_grace_period"].removesuffix("s"))
    assert grace >= cfg.shutdown.grace_s + cfg.shutdown.drain_s


def test_docker_build_context_leaves_out_the_venv() -> None:
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "tests"} <= set(ignored)
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert src not in ignored, f"{src} is copied but left out of the context"


async def test_real_prometheus_counts_each_node_once_over_two_replicas(
    fleet: MakeSim,
    make_router: MakeRouter,
    redis_server: RedisServer,
    tmp_path: Path,
    prometheus: StartPrometheus,
) -> None:
    """Two replicas sharing Redis and one serving node, scraped by a real Prometheus
    with the shipped alert rules: the supply expression reads 1 (not 2), and
    BallastVerifiedSupplyLow is pending on its way to firing."""
    sim = await fleet("only")
    state = {"redis_url": redis_server.url}
    replicas = [await make_router([node_entry(sim)], state=state) for _ in range(2)]
    shutil.copy(DEPLOY / "prometheus/alerts.yml", tmp_path / "alerts.yml")
    targets = [r.url.removeprefix("http://") for r in replicas]
    api = await prometheus(
        {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": ["alerts.yml"],
            "scrape_configs": [{"job_name": "ballast", "static_configs": [{"targets": targets}]}],
        }
    )
    async with aiohttp.ClientSession() as http:

        async def query(expr: str) -> list[dict[str, Any]]:
            try:
                async with http.get(api, params={"query": expr}) as resp:
                    return (await resp.json())["data"]["result"]
            except aiohttp.ClientError:
                return []  # not listening yet

        async def until(expr: str) -> list[dict[str, Any]]:
            async with asyncio.timeout(60):  # Prometheus start-up, scrapes, a rule round
                while True:
                    if found := await query(expr):
                        return found
                    await asyncio.sleep(0.2)  # polling an external process's state

        await until('count(ballast_supply_nodes{model="tiny-llama",state="serving"}) == 2')
        naive = await query('sum(ballast_supply_nodes{model="tiny-llama",state="serving"})')
        assert float(naive[0]["value"][1]) == 2  # what a sum over replicas would say
        alert = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())
        rules = {r["alert"]: r["expr"] for r in alert["groups"][0]["rules"]}
        low = rules["BallastVerifiedSupplyLow"].removesuffix(" < 2")
        (supply,) = await query(low)
        assert supply["metric"] == {"model": "tiny-llama"}
        assert float(supply["value"][1]) == 1
        pending = await until('ALERTS{alertname="BallastVerifiedSupplyLow"}')
        assert pending[0]["metric"]["alertstate"] == "pending"
        assert pending[0]["metric"]["model"] == "tiny-llama"
