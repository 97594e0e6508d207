"""The shipped deployment files stay valid."""

from __future__ import annotations

from pathlib import Path

from replicator.config import load_config

ROOT = Path(__file__).resolve().parent.parent


def test_example_config_is_valid() -> None:
    cfg = load_config(str(ROOT / "deploy" / "replicator.yml"))
    (db,) = cfg.dbs
    assert [r.name for r in db.replicas] == ["local", "s3"]
    assert cfg.metrics_addr == "127.0.0.1:9090"


def test_container_runs_as_non_root() -> None:
    text = (ROOT / "Dockerfile").read_text()
    users = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert users and all(not u.startswith(("root", "0")) for u in users)
    assert users[-1].split(":")[0] != "0"
