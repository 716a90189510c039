"""Configuration shown in the docs and deployment files is valid."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from router.config import parse_config

ROOT = Path(__file__).resolve().parent.parent
ENV = {"NODE_A_KEY": "k", "BALLAST_JOIN_TOKEN": "j", "BALLAST_ADMIN_TOKEN": "a", "TEAM_A_KEY": "t"}


def test_readme_configuration_overview_is_valid() -> None:
    block = re.search(r"```yaml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block is not None
    cfg = parse_config(yaml.safe_load(block.group(1)), env=ENV)
    assert cfg.policy.name == "score" and cfg.nodes[0].id == "node-a"
