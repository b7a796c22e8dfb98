"""cluster.yaml / cluster-local.yaml: Ray's own schema validation (offline) and the security properties.

Fast checks (milliseconds, no network, no cloud) run in the default CI set:

    pytest tests/integration/test_cluster.py -m "not slow"

The slow test brings the local-provider cluster up with `ray up`, runs the smoke study through
`ray job submit` and takes it down with `ray down` (scripts/local_cluster_test.sh; root, ~1.5 min on 2 cores):

    pytest tests/integration/test_cluster.py -m slow

docs/CLUSTER.md explains the configuration these tests pin down.
"""

from __future__ import annotations

import copy
import ipaddress
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER_YAML = REPO / "cluster.yaml"
LOCAL_YAML = REPO / "cluster-local.yaml"
DOCS = REPO / "docs" / "CLUSTER.md"
SCRIPT = REPO / "scripts" / "local_cluster_test.sh"

# Ports that must never be reachable from outside the cluster: Ray dashboard / Jobs API, GCS, Ray client,
# object manager, MLflow.
PRIVATE_PORTS = (8265, 6379, 10001, 8076, 5000)
WORLD = {"0.0.0.0/0", "::/0"}


def _load(path: Path) -> dict[str, Any]:
    with open(path) as f:
        return yaml.safe_load(f)


def _prepared(path: Path) -> dict[str, Any]:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(_load(path)))
    validate_config(config)
    return config


def _joined(commands: list[str]) -> str:
    return "\n".join(commands)


# ---- Ray's own validation ------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [CLUSTER_YAML, LOCAL_YAML], ids=lambda p: p.name)
def test_config_passes_ray_validation(path: Path) -> None:
    config = _prepared(path)
    assert config["cluster_name"]
    assert config["head_node_type"] in config["available_node_types"]


def test_aws_node_types_head_cpu_and_a10g_workers() -> None:
    config = _prepared(CLUSTER_YAML)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node (Ray head + MLflow)"
    assert head["max_workers"] == 0

    by_instance = {t["node_config"]["InstanceType"]: t for name, t in types.items() if name != config["head_node_type"]}
    assert by_instance["g5.xlarge"]["resources"]["GPU"] == 1
    assert by_instance["g5.12xlarge"]["resources"]["GPU"] == 4
    for node_type in by_instance.values():
        assert node_type["min_workers"] == 0, "GPU nodes start on demand"
        assert node_type["max_workers"] >= 1
    assert sum(t["max_workers"] for t in by_instance.values()) <= config["max_workers"]
    assert config["provider"]["cache_stopped_nodes"] is False, "`ray down` terminates GPU nodes"


def test_setup_installs_pinned_package_from_mounted_project() -> None:
    raw = _load(CLUSTER_YAML)
    assert raw["file_mounts"]["~/sage_dist"] == "."
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert ".venv" in raw["rsync_exclude"]
    setup = _joined(raw["setup_commands"])
    assert "pip install -q -r ~/sage_dist/requirements/gpu.txt" in setup
    assert "pip install -q --no-deps -e ~/sage_dist" in setup
    # `ray down` runs `ray stop` through the login shell: the venv must be on PATH there.
    assert 'export PATH="$HOME/venv/bin:$PATH"' in setup and "~/.bashrc" in setup


def test_gpu_requirements_pin_the_cpu_versions() -> None:
    def pins(path: Path) -> dict[str, str]:
        out = {}
        for line in path.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            name = re.split(r"[=<>!~\[ ;]", line, maxsplit=1)[0].lower()
            out[name] = line
        return out

    cpu, gpu = pins(REPO / "requirements" / "cpu.txt"), pins(REPO / "requirements" / "gpu.txt")
    runtime = set(cpu) - {"pytest", "pytest-timeout"}
    assert runtime <= set(gpu), f"gpu.txt lacks {sorted(runtime - set(gpu))}"
    for name in runtime:
        assert gpu[name] == cpu[name], f"{name}: gpu.txt has {gpu[name]!r}, cpu.txt has {cpu[name]!r}"
    assert gpu["torch"].startswith("torch=="), "torch is pinned"


# ---- security -------------------------------------------------------------------------------------------
def _effective_inbound_rules(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The inbound rules Ray 2.60 gives a security group it creates for this config.

    Mirrors ``ray.autoscaler._private.aws.config._create_default_inbound_rules`` (all traffic from the
    cluster's own group, SSH 22 from anywhere, then ``provider.security_group.IpPermissions``); when boto3 is
    installed the test below also compares with Ray's function itself.
    """
    extra = config["provider"].get("security_group", {}).get("IpPermissions", [])
    return [
        {"FromPort": -1, "ToPort": -1, "IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": "sg-self"}]},
        {"FromPort": 22, "ToPort": 22, "IpProtocol": "tcp", "IpRanges": [{"CidrIp": "0.0.0.0/0"}]},
        *extra,
    ]


def _cidrs(rule: dict[str, Any]) -> set[str]:
    return {r["CidrIp"] for r in rule.get("IpRanges", [])} | {r["CidrIpv6"] for r in rule.get("Ipv6Ranges", [])}


def _covers(rule: dict[str, Any], port: int) -> bool:
    if rule["IpProtocol"] == "-1":
        return True
    return rule["FromPort"] <= port <= rule["ToPort"]


def test_config_opens_nothing_beyond_the_group() -> None:
    config = _prepared(CLUSTER_YAML)
    group = config["provider"]["security_group"]
    assert group["GroupName"] == "sage-dist-ray"
    for rule in group.get("IpPermissions", []):
        # The only rule allowed from an address range: SSH from a specific (non-world) CIDR.
        if _cidrs(rule):
            assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 22, 22), rule
            assert not (_cidrs(rule) & WORLD), rule
    for name, node_type in config["available_node_types"].items():
        assert "SecurityGroupIds" not in node_type["node_config"], f"{name}: use the named group"

    rules = _effective_inbound_rules(config)
    for rule in rules:
        if rule.get("UserIdGroupPairs"):
            continue  # traffic from the cluster's own group
        assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 22, 22), rule
        for port in PRIVATE_PORTS:
            assert not (_covers(rule, port) and _cidrs(rule) & WORLD), f"port {port} open to the world: {rule}"


def test_effective_rules_match_rays_own_function() -> None:
    pytest.importorskip("boto3")
    from ray.autoscaler._private.aws.config import _create_default_inbound_rules

    config = _prepared(CLUSTER_YAML)
    extra = config["provider"]["security_group"].get("IpPermissions", [])
    assert _create_default_inbound_rules({"sg-self"}, extra) == _effective_inbound_rules(config)


def test_docs_precreate_group_with_ssh_from_one_cidr_and_self() -> None:
    """docs/CLUSTER.md step 1 creates the group: SSH 22 from $MY_CIDR, all traffic from the group, nothing else."""
    text = DOCS.read_text()
    commands = [" ".join(m.split()) for m in re.findall(r"aws ec2 authorize-security-group-ingress[^\n]*(?:\\\n[^\n]*)*", text)]
    commands = [c.replace("\\ ", "") for c in commands]
    assert len(commands) == 2, commands
    seen = set()
    for command in commands:
        args = shlex.split(command)
        options = dict(zip(args[3::2], args[4::2]))
        if options.get("--protocol") == "tcp":
            assert options["--port"] == "22" and options["--cidr"] == "$MY_CIDR", command
            seen.add("ssh")
        else:
            assert options["--protocol"] == "-1" and options["--source-group"] == "$SG_ID", command
            seen.add("self")
    assert seen == {"ssh", "self"}
    example = re.search(r"MY_CIDR=([0-9./]+)", text)
    assert example and ipaddress.ip_network(example.group(1)).prefixlen == 32
    assert "group-name sage-dist-ray" in text


def test_ui_ports_bind_privately_and_token_auth_is_on() -> None:
    for path in (CLUSTER_YAML, LOCAL_YAML):
        raw = _load(path)
        head = _joined(raw["head_start_ray_commands"])
        workers = _joined(raw["worker_start_ray_commands"])
        assert "--dashboard-host=127.0.0.1" in head, path.name
        assert "0.0.0.0" not in head + workers, path.name
        assert "--disable-security-middleware" not in head
        assert "--ray-client-server-port" not in head
        assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in workers, path.name
        host = re.search(r"mlflow server --host (\S+)", head).group(1)
        assert host in ('"$0"', "127.0.0.1"), f"{path.name}: MLflow must bind 127.0.0.1 or the private address"
    aws_head = _joined(_load(CLUSTER_YAML)["head_start_ray_commands"])
    assert "ray.util.get_node_ip_address()" in aws_head and '"$HEAD_IP"' in aws_head


def test_workers_point_studies_at_the_head_mlflow() -> None:
    raw = _load(CLUSTER_YAML)
    assert 'MLFLOW_TRACKING_URI="http://$RAY_HEAD_IP:5000"' in _joined(raw["worker_start_ray_commands"])
    assert 'MLFLOW_TRACKING_URI="http://$HEAD_IP:5000"' in _joined(raw["head_start_ray_commands"])
    local = _load(LOCAL_YAML)
    assert "MLFLOW_TRACKING_URI=http://127.0.0.1:5000" in _joined(local["head_start_ray_commands"])


def test_local_config_does_not_stop_other_peoples_ray() -> None:
    """`ray stop` kills every Ray process of the user; the local config never runs it on start-up."""
    raw = _load(LOCAL_YAML)
    assert raw["provider"] == {"type": "local", "head_ip": "127.0.0.1", "worker_ips": []}
    for key in ("setup_commands", "head_setup_commands", "head_start_ray_commands", "worker_start_ray_commands"):
        assert "ray stop" not in _joined(raw.get(key, [])), key
    assert "--node-ip-address=127.0.0.1" in _joined(raw["head_start_ray_commands"])


def test_docs_cover_the_walkthrough() -> None:
    text = DOCS.read_text()
    for needle in ("ray up", "ray job submit", "ray dashboard cluster.yaml", "ssh -N -L", "ray down",
                   "safetensors", "RAY_AUTH_MODE=token", "max_concurrent_trials", "num_workers",
                   "scripts/local_cluster_test.sh"):
        assert needle in text, needle


# ---- the real thing on one machine ---------------------------------------------------------------------
def _local_cluster_skip_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return "needs Linux namespaces"
    if os.geteuid() != 0:
        return "needs root (sshd, unshare, apt-get)"
    for tool in ("unshare", "ip", "ssh-keygen"):
        if shutil.which(tool) is None:
            return f"{tool} is missing"
    return None


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_local_cluster_up_smoke_down(tmp_path: Path) -> None:
    """`ray up cluster-local.yaml` on 127.0.0.1, smoke study via `ray job submit`, `ray down`, nothing left."""
    reason = _local_cluster_skip_reason()
    if reason:
        pytest.skip(reason)
    env = dict(os.environ, SAGE_DIST_PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=REPO, env=env, capture_output=True, text=True, timeout=880)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    assert "PASS: ray up, smoke job, ray down, no Ray process left" in out
    timings = dict(re.findall(r"timing: (\S+) ([0-9.]+)", out))
    assert {"ray_up", "ray_down", "total"} <= set(timings), out[-2000:]
    print("local cluster timings (s):", timings)
