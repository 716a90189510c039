"""A config that says everything at once: ``check-config`` (and ``serve``) list every
problem with its key path and YAML line; numeric price labels; ``keys update``; and
commands whose reader leaves early (``ballast nodes --watch | head``)."""

from __future__ import annotations

import asyncio
import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import aiohttp
import pytest

from router.config import ConfigError, load_config, parse_config
from tests.conftest import MakeRouter, MakeSim, node_entry

BALLAST = [sys.executable, "-m", "router.cli"]
ADMIN_TOKEN = "admin-token"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
VARS = ("TEAM_KEY", "NODE_KEY", "JOIN_TOKEN", "ADMIN_TOKEN_VAR", "METRICS_TOKEN")


def environ(**set_: str) -> dict[str, str]:
    """This process's environment without the variables the configs here name."""
    return {**{k: v for k, v in os.environ.items() if k not in VARS}, **set_}


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BALLAST, *args], capture_output=True, text=True, timeout=60, env=env or environ()
    )


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ballast.yaml"
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def problems(stderr: str) -> list[str]:
    """The problem lines of an ``invalid config`` answer (after its heading)."""
    heading, *lines = stderr.strip().splitlines()
    assert heading.startswith("ballast: invalid config ") and heading.endswith(":"), stderr
    return lines


# Line numbers are the file's: the text starts at line 1 with "listen:".
MANY = """
listen:
  port: 99999
  hots: 0.0.0.0
policy:
  name: score
  params:
    reliability_weigth: 3
    queue_weight: 1
nodes:
  - id: a
    url: ftp://a
    models: [m]
    labels: {region: 1}
  - id: b
    url: http://127.0.0.1:9
    models: [m]
  - id: b
    url: http://127.0.0.1:10
    models: [m]
hedge: {p95_min_ms: 500, p95_max_ms: 100}
auth:
  keys:
    - name: team
      key_env: TEAM_KEY
retries:
  max_attempts: 0
"""


def test_check_config_lists_every_problem_with_its_path_and_line(tmp_path: Path) -> None:
    out = run("check-config", str(write(tmp_path, MANY)))
    assert out.returncode == 2 and out.stdout == ""
    assert "Traceback" not in out.stderr
    assert "(9 problems)" in out.stderr.splitlines()[0]
    assert problems(out.stderr) == [
        "listen.port: Input should be less than or equal to 65535 (line 2)",
        "listen.hots: unknown key; did you mean host? (line 3)",
        "policy.params.reliability_weigth: unknown parameter; did you mean reliability_weight?"
        " (line 7)",
        "nodes[0].url: must be an http:// or https:// URL with a host (line 11)",
        "nodes[0].labels.region: Input should be a valid string"
        " (quote it: YAML reads it as a number) (line 13)",
        "nodes[2].id: duplicate node id 'b' (nodes[1]) (line 17)",  # nodes[0] aside
        "hedge: p95_min_ms must not exceed p95_max_ms (line 20)",
        "auth.keys[0].key_env: environment variable TEAM_KEY is not set (line 24)",
        "retries.max_attempts: Input should be greater than or equal to 1 (line 26)",
    ]


def test_serve_with_a_bad_config_prints_the_same_list(tmp_path: Path) -> None:
    path = write(tmp_path, MANY)
    checked, served = run("check-config", str(path)), run("serve", "--config", str(path))
    assert served.returncode == 2 and "Traceback" not in served.stderr
    assert problems(served.stderr) == problems(checked.stderr)


def test_set_variables_make_the_same_file_valid(tmp_path: Path) -> None:
    text = """
    admin: {token_env: ADMIN_TOKEN_VAR}
    metrics: {token_env: METRICS_TOKEN}
    registry: {join_token_env: JOIN_TOKEN}
    auth:
      keys: [{name: team, key_env: TEAM_KEY}]
    nodes:
      - {id: a, url: "http://127.0.0.1:9", models: [m], api_key_env: NODE_KEY}
    """
    path = write(tmp_path, text)
    out = run("check-config", str(path))
    assert out.returncode == 2
    assert problems(out.stderr) == [
        "admin.token_env: environment variable ADMIN_TOKEN_VAR is not set (line 1)",
        "metrics.token_env: environment variable METRICS_TOKEN is not set (line 2)",
        "registry.join_token_env: environment variable JOIN_TOKEN is not set (line 3)",
        "auth.keys[0].key_env: environment variable TEAM_KEY is not set (line 5)",
        "nodes[0].api_key_env: environment variable NODE_KEY is not set (line 7)",
    ]
    env = environ(**{name: "set" for name in VARS})
    out = run("check-config", str(path), env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines() == [
        f"{path}: ok (1 static node(s), policy score, state in-memory)"
    ]
    # A node's API key may be empty (a server without one); the other tokens may not.
    out = run("check-config", str(path), env={**env, "NODE_KEY": "", "TEAM_KEY": ""})
    assert problems(out.stderr) == [
        "auth.keys[0].key_env: environment variable TEAM_KEY is not set (line 5)"
    ]


@pytest.mark.parametrize(
    ("policy", "line"),
    [
        ("{name: scor}", "policy.name: unknown policy 'scor'; did you mean score? (line 1)"),
        (
            "{name: fastest}",
            "policy.name: unknown policy 'fastest' (known: least_outstanding, p2c_peak_ewma,"
            " random, round_robin, score) (line 1)",
        ),
        (
            "{name: score, params: {speed: 1}}",
            "policy.params.speed: unknown parameter (known: headroom_weight, price_weight,"
            " queue_weight, reliability_weight) (line 1)",
        ),
        (
            "{name: round_robin, params: {weight: 1}}",
            "policy.params.weight: unknown parameter (policy round_robin takes none) (line 1)",
        ),
        (
            "{name: score, params: {queue_weight: -1}}",
            "policy.params: invalid params: queue_weight must be a number >= 0 (line 1)",
        ),
    ],
)
def test_policy_problems_name_the_closest_known_one(tmp_path: Path, policy: str, line: str) -> None:
    out = run("check-config", str(write(tmp_path, f"policy: {policy}\n")))
    assert out.returncode == 2 and problems(out.stderr) == [line]


def test_yaml_problems_have_their_line(tmp_path: Path) -> None:
    text = """
    retries:
      max_attempts: 0
    limits: {}
    retries:
      max_attempts: 2
    """
    out = run("check-config", str(write(tmp_path, text)))
    assert problems(out.stderr) == [
        "retries: duplicate key (first at line 1); give it once (line 4)"
    ]
    out = run("check-config", str(write(tmp_path, "listen:\n  port: 1\n bad: [\n")))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "not valid YAML" in out.stderr and "(line 3)" in out.stderr


def test_problems_in_the_api() -> None:
    """``parse_config`` raises them all, each with its key path as a tuple; without line
    information there is no line."""
    doc = {
        "nodes": [{"id": "a", "url": "http://x", "models": ["m"]}] * 2,
        "auth": {"keys": [{"name": "k", "key_env": "K"}], "required": "maybe"},
        "policy": {"params": {"headroom_wieght": 1}},
        "state": {"cluster": True},
    }
    with pytest.raises(ConfigError) as info:
        parse_config(doc, env={})
    assert [(p.loc, p.line) for p in info.value.problems] == [
        (("auth", "required"), None),
        (("auth", "keys", 0, "key_env"), None),
        (("nodes", 1, "id"), None),
        (("state", "redis_url"), None),
        (("policy", "params", "headroom_wieght"), None),
    ]
    assert "did you mean headroom_weight?" in str(info.value)
    # The redis URL from the environment satisfies state.cluster.
    cfg = parse_config({"state": {"cluster": True}}, env={"BALLAST_REDIS_URL": "redis://h:1"})
    assert cfg.state.redis_url == "redis://h:1"


def test_numbers_are_accepted_in_labels_ballast_reads_as_numbers(tmp_path: Path) -> None:
    text = """
    nodes:
      - id: a
        url: http://127.0.0.1:9
        models: [m]
        labels: {price_per_mtok: 0.2, price_per_hour: 3, max_concurrency: 4, pool: spot}
    """
    path = write(tmp_path, text)
    assert run("check-config", str(path)).returncode == 0
    labels = load_config(path, env={}).nodes[0].labels
    assert labels == {
        "price_per_mtok": "0.2", "price_per_hour": "3", "max_concurrency": "4", "pool": "spot"
    }  # fmt: skip
    bad = """
    nodes:
      - id: a
        url: http://127.0.0.1:9
        models: [m]
        labels: {price_per_mtok: true, context_length: 0, pool: 2}
    """
    out = run("check-config", str(write(tmp_path, bad)))
    assert out.returncode == 2
    assert problems(out.stderr) == [
        "nodes[0].labels.price_per_mtok: Input should be a valid string (line 5)",
        "nodes[0].labels.pool: Input should be a valid string"
        " (quote it: YAML reads it as a number) (line 5)",
    ]
    out = run(
        "check-config", str(write(tmp_path, bad.replace("true", "0.5").replace(", pool: 2", "")))
    )
    assert problems(out.stderr) == [
        "nodes[0].labels: label context_length: must be a number from 1 to 1e+08 (line 5)"
    ]


@pytest.fixture
def admin_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_ADMIN_TOKEN", ADMIN_TOKEN)


async def cli(router: str, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *BALLAST, *args, "--router", router, "--admin-token", ADMIN_TOKEN,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_a_priced_node_from_the_config_has_its_price(
    admin_env: None, fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    labels = {"price_per_mtok": 0.2, "max_concurrency": 4}
    r = await make_router(
        [node_entry(await fleet("a"), labels=labels)], admin={"token_env": "TEST_ADMIN_TOKEN"}
    )
    async with http.get(r.url + "/admin/nodes", headers=ADMIN) as resp:
        (node,) = (await resp.json())["nodes"]
    assert node["price_per_mtok"] == 0.2


async def test_keys_update_changes_only_what_it_is_given(
    admin_env: None, fleet: MakeSim, make_router: MakeRouter, http: aiohttp.ClientSession
) -> None:
    r = await make_router(
        [node_entry(await fleet("a"))], admin={"token_env": "TEST_ADMIN_TOKEN"},
        pools={"order": ["spot", "reserved"]},
    )  # fmt: skip

    async def key(name: str) -> dict[str, object]:
        async with http.get(r.url + "/admin/keys", headers=ADMIN) as resp:
            return next(k for k in (await resp.json())["data"] if k["name"] == name)

    code, _, _ = await cli(
        r.url, "keys", "create", "--name", "team-a", "--rpm", "600", "--tpm", "9000"
    )
    assert code == 0
    code, out, err = await cli(
        r.url, "keys", "update", "team-a", "--rpm", "1200", "--models", "m1,m2",
        "--budget-tokens", "5000", "--budget-period", "month", "--priority", "batch",
        "--pools", "spot", "--max-parallel", "3", "--region", "eu",
    )  # fmt: skip
    assert code == 0, err
    (line,) = out.strip().splitlines()
    assert line.startswith("updated team-a (key_") and line.endswith(
        ": priority batch, rpm 1200, max_parallel 3, budget_tokens 5000, budget_period month,"
        " region eu, models m1,m2, pools spot"
    )
    k = await key("team-a")
    assert (k["rpm"], k["tpm"], k["models"], k["priority"]) == (1200, 9000, ["m1", "m2"], "batch")
    assert (k["budget_tokens"], k["budget_period"], k["max_parallel"]) == (5000, "month", 3)
    assert (k["pools"], k["region"]) == (["spot"], "eu")
    # none removes a limit, '' allows every model, --name renames; by id as well as name.
    code, out, err = await cli(
        r.url, "keys", "update", str(k["id"]), "--rpm", "none", "--models", "", "--name", "team-b"
    )
    assert code == 0, err
    assert out.strip().endswith(": rpm none, models *") and "team-b" in out
    k = await key("team-b")
    assert (k["rpm"], k["tpm"], k["models"], k["priority"]) == (None, 9000, [], "batch")
    # Mistakes: one line each, nothing changed.
    code, _, err = await cli(r.url, "keys", "update", "team-b")
    assert code == 2 and "nothing to change" in err
    code, _, err = await cli(r.url, "keys", "update", "nobody", "--rpm", "5")
    assert code == 1 and "HTTP 404" in err and len(err.strip().splitlines()) == 1
    code, _, err = await cli(r.url, "keys", "update", "team-b", "--budget-tokens", "0")
    assert code == 1 and "HTTP 400" in err and "Traceback" not in err
    code, _, err = await cli(r.url, "keys", "update", "team-b", "--rpm", "lots")
    assert code == 2 and "'lots' is not an integer or none" in err
    assert (await key("team-b"))["pools"] == ["spot"]


async def test_nodes_watch_into_head_ends_quietly(
    admin_env: None, fleet: MakeSim, make_router: MakeRouter
) -> None:
    r = await make_router([node_entry(await fleet("a"))], admin={"token_env": "TEST_ADMIN_TOKEN"})
    watch = shlex.join(
        [*BALLAST, "nodes", "--watch", "--interval", "0.01", "--router", r.url,
         "--admin-token", ADMIN_TOKEN]
    )  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        "bash", "-o", "pipefail", "-c", f"{watch} | head -n 1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err  # pipefail: ballast's own status
    assert err == b""
    assert out.decode().split()[:3] == ["NODE", "GPU", "STATE"]  # no screen clearing in a pipe


@pytest.mark.parametrize(
    "command",
    [["nodes", "--watch", "--interval", "0.01"], ["nodes"], ["nodes", "--json"], ["usage"],
     ["keys", "list"]],
)  # fmt: skip
async def test_a_reader_that_left_before_any_output(
    admin_env: None, fleet: MakeSim, make_router: MakeRouter, command: list[str]
) -> None:
    """stdout is a pipe nobody reads any more: every write fails with EPIPE."""
    r = await make_router([node_entry(await fleet("a"))], admin={"token_env": "TEST_ADMIN_TOKEN"})
    read, write_end = os.pipe()
    os.close(read)
    try:
        proc = await asyncio.create_subprocess_exec(
            *BALLAST, *command, "--router", r.url, "--admin-token", ADMIN_TOKEN,
            stdout=write_end, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
    finally:
        os.close(write_end)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0 and err == b""
