"""A short smoke run of the policy comparison: outputs exist and add up."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

SCENARIO = {
    "name": "smoke",
    "seed": 1,
    "fleet": {
        "seed": 1,
        "time_scale": 0.1,
        "nodes": [
            {"id": "fast", "profile": "H100", "count": 2},
            {
                "id": "slow",
                "profile": "T4",
                "count": 2,
                "faults": [{"mode": "error", "status": 503, "at": 0.5, "for": 1}],
            },
        ],
    },
    "load": {"rate": 40, "stream_fraction": 0.5, "prompt_tokens": [20], "max_tokens": [4]},
    "router": {"timeouts": {"first_byte_s": 2}},
}


@pytest.mark.parametrize(
    ("policies", "redis"), [("round_robin,p2c_peak_ewma", False), ("p2c_peak_ewma", True)]
)
def test_compare_smoke(tmp_path: Path, policies: str, redis: bool) -> None:
    scenario = tmp_path / "smoke.yaml"
    scenario.write_text(yaml.safe_dump(SCENARIO))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "loadtest.compare", "--scenario", str(scenario),
           "--policies", policies, "--duration", "3", "--out", str(out)]  # fmt: skip
    done = subprocess.run(
        cmd + (["--redis"] if redis else []), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads((out / "summary.json").read_text())
    assert doc["redis"] is redis and list(doc["policies"]) == policies.split(",")
    for name, s in doc["policies"].items():
        assert s["requests"] > 60  # 40/s for 3 s, Poisson
        assert sum(s["statuses"].values()) == s["requests"]
        assert s["ok"] <= s["requests"] and s["success_rate"] == round(s["ok"] / s["requests"], 4)
        assert abs(sum(s["per_node_share"].values()) - 1) < 0.01
        assert set(s["per_node_share"]) <= {"fast-0", "fast-1", "slow-0", "slow-1"}
        assert s["latency_ms"]["p50"] <= s["latency_ms"]["p99"]
        assert (out / f"share_{name}.png").stat().st_size > 10_000
        assert [a for _, n, a in doc["fault_events"][name] if n == "slow-0"] == ["error", "recover"]
    assert (out / "latency_cdf.png").stat().st_size > 10_000
    report = (out / "report.md").read_text()
    assert all(f"| {p} |" in report for p in policies.split(","))
