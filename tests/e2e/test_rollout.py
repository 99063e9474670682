"""Roll-out: Kubernetes manifests, the image's Dockerfile, the ansible playbook.

The manifests are built with kubectl kustomize and validated offline against the Kubernetes
schemas, and each role's arguments (after the kubelet's $(VAR) expansion) plus its ConfigMap
are parsed by the real CLI and config classes; the install/uninstall init containers' exact
commands run against a fake host root whose containerd is real (restarted through a fake
systemctl). The playbook runs against a booted Debian host (systemd-nspawn) with a real
systemd and containerd and no network.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import tomllib
import yaml
from support import REPO, require_root
from support.rollout import (
    SAMPLE_CONTAINERD_CONFIG,
    HostContainerd,
    make_host_root,
    need,
    short_tmpdir,
    snapshot,
)
from support.systemd_host import PLUGINS, SystemdHost, rootfs_tarball, scratch_dir, snapshot_paths

from p2p_mirror.core.config import AgentConfig, SeederConfig, TrackerConfig, load_config

DAEMONSET = REPO / "deploy/daemonset"
PRODUCTION = REPO / "deploy/examples/production"
NSENTER_PLUGINS = PLUGINS / "connection"
WHEELHOUSE_CACHE = Path("/var/tmp/p2p-mirror-test-wheelhouses")
ANSIBLE = REPO / "ansible"
MIRROR = "http://127.0.0.1:5004"


# --- helpers --------------------------------------------------------------------------------


def kustomize(path: Path) -> list[dict[str, Any]]:
    out = subprocess.run([need("kubectl"), "kustomize", str(path)], check=True,
                         capture_output=True, text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for d in docs:
        if d["kind"] == kind and d["metadata"]["name"] == name:
            return d
    names = [(d["kind"], d["metadata"]["name"]) for d in docs]
    raise AssertionError(f"no {kind}/{name} in {names}")


_SUFFIX = {"m": Fraction(1, 1000), "": Fraction(1), "k": Fraction(1000), "M": Fraction(10**6),
           "G": Fraction(10**9), "Ki": Fraction(2**10), "Mi": Fraction(2**20),
           "Gi": Fraction(2**30), "Ti": Fraction(2**40)}


def quantity(text: str | int) -> Fraction:
    """A Kubernetes quantity as an exact number (cpu cores or bytes)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(m|k|M|G|Ki|Mi|Gi|Ti|)", str(text))
    assert m, f"not a quantity: {text!r}"
    return Fraction(m.group(1)) * _SUFFIX[m.group(2)]


def container(workload: dict[str, Any], name: str, init: bool = False) -> dict[str, Any]:
    spec = workload["spec"]["template"]["spec"]
    for c in spec["initContainers" if init else "containers"]:
        if c["name"] == name:
            return c
    raise AssertionError(f"no container {name}")


def cli_argv(command: list[str], host: Path) -> list[str]:
    """The manifest's command with /host moved to the test's root, run from this checkout."""
    assert command[0] == "p2p-mirror", command
    args = [str(host) if a == "/host" else a for a in command[1:]]
    runner = "import sys; from p2p_mirror.cli import main; sys.argv[0] = 'p2p-mirror'; main()"
    return [sys.executable, "-c", runner, *args]


def run_in_pid_namespace(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run where `nsenter -t 1` means this process (the sandbox hides the real PID 1)."""
    env = dict(env, PYTHONPATH=str(REPO))
    return subprocess.run([need("unshare"), "--pid", "--fork", "--mount-proc", "--", *argv],
                          env=env, capture_output=True, text=True, timeout=300, cwd=REPO)


def containerd_config_dump(config: Path) -> str:
    proc = subprocess.run([need("containerd"), "--config", str(config), "config", "dump"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# --- Dockerfile -----------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    proc = subprocess.run([need("hadolint"), str(REPO / "Dockerfile")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_copies_every_package_the_wheel_needs() -> None:
    """The image must carry every package pyproject.toml ships, or the CLI fails to import."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    packages = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    dockerfile = (REPO / "Dockerfile").read_text()
    for pattern in packages:
        name = pattern.rstrip("*")
        assert re.search(rf"^COPY {name} \./{name}$", dockerfile, re.M), name
    assert re.search(r"^USER 10001", dockerfile, re.M), "the image must not run as root"


# --- Kubernetes manifests -------------------------------------------------------------------


CRD_KINDS = {"ServiceMonitor"}  # no schema offline; asserted on below instead


@pytest.mark.parametrize("path", [DAEMONSET, DAEMONSET / "uninstall", PRODUCTION],
                         ids=["install", "uninstall", "production"])
def test_manifests_build_and_validate_offline(path: Path, tmp_path: Path) -> None:
    need("kubernetes-validate")
    docs = kustomize(path)
    assert docs and all(d["metadata"]["namespace"] == "kube-system" for d in docs)
    checked = [d for d in docs if d["kind"] not in CRD_KINDS]
    manifest = tmp_path / "built.yaml"
    manifest.write_text(yaml.safe_dump_all(checked))
    for version in ("1.29.0", None):
        argv = ["kubernetes-validate", "--strict", str(manifest)]
        if version:
            argv[1:1] = ["-k", version]
        proc = subprocess.run(argv, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.count("passed") == len(checked), proc.stdout


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    return workload["spec"]["template"]["spec"]


def test_manifests_match_the_addon_layout() -> None:
    docs = kustomize(DAEMONSET)
    agent = by_kind(docs, "DaemonSet", "p2p-mirror-agent")
    seeder = by_kind(docs, "StatefulSet", "p2p-mirror-seeder")
    tracker = by_kind(docs, "StatefulSet", "p2p-mirror-tracker")
    pdb = by_kind(docs, "PodDisruptionBudget", "p2p-mirror-seeder")
    assert pdb["spec"]["selector"]["matchLabels"] == seeder["spec"]["selector"]["matchLabels"]

    # Resource requests and limits as in the TKE addon.
    expected = [
        (agent, "agent", ("0.2", "0.2Gi"), ("4", "2Gi")),
        (seeder, "seeder", ("0.5", "0.5Gi"), ("4", "4Gi")),
        (tracker, "tracker", ("0.5", "0.5Gi"), ("2", "4Gi")),
    ]
    for workload, name, requests, limits in expected:
        res = container(workload, name)["resources"]
        for kind, (cpu, mem) in (("requests", requests), ("limits", limits)):
            assert quantity(res[kind]["cpu"]) == quantity(cpu), (name, kind)
            assert quantity(res[kind]["memory"]) == quantity(mem), (name, kind)
        for probe in ("livenessProbe", "readinessProbe"):
            assert container(workload, name)[probe]["httpGet"]["path"] == "/healthz"
        assert container(workload, name)["securityContext"]["runAsNonRoot"] is True

    assert pod_spec(seeder)["nodeSelector"]["proxy"] == "p2p-proxy"
    assert pod_spec(tracker)["nodeSelector"]["tracker"] == "p2p-tracker"
    pod = pod_spec(agent)
    assert pod["hostNetwork"] is True
    cache = next(v for v in pod["volumes"] if v["name"] == "cache")
    assert cache["hostPath"]["path"] == "/var/lib/p2p-mirror/agent"


# --- node selection (issue 22 item 5) ---


def _term_matches(expressions: list[dict[str, Any]], labels: dict[str, str]) -> bool:
    for e in expressions:
        key, op, values = e["key"], e["operator"], e.get("values", [])
        ok = {"In": key in labels and labels[key] in values,
              "NotIn": key not in labels or labels[key] not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def schedulable_on(workload: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether the scheduler's node selection (nodeSelector + required node affinity, the
    semantics of the Kubernetes docs) admits a node with ``labels``; taints are tolerated."""
    spec = pod_spec(workload)
    if any(labels.get(k) != v for k, v in spec.get("nodeSelector", {}).items()):
        return False
    required = (spec.get("affinity", {}).get("nodeAffinity", {})
                .get("requiredDuringSchedulingIgnoredDuringExecution"))
    if required is None:
        return True
    return any(_term_matches(t.get("matchExpressions", []), labels)
               for t in required["nodeSelectorTerms"])


LINUX = {"kubernetes.io/os": "linux", "kubernetes.io/hostname": "n1"}
OPTED_IN = {**LINUX, "p2p-mirror.io/enabled": "true"}
NODES = {
    "opted-in": OPTED_IN,
    "not labelled": LINUX,
    "label false": {**LINUX, "p2p-mirror.io/enabled": "false"},
    "windows": {**OPTED_IN, "kubernetes.io/os": "windows"},
    "virtual-kubelet": {**OPTED_IN, "type": "virtual-kubelet"},
    "aks virtual node": {**OPTED_IN, "kubernetes.azure.com/managed-virtual-node": "true"},
    "eks fargate": {**OPTED_IN, "eks.amazonaws.com/compute-type": "fargate"},
    "tke eklet": {**OPTED_IN, "node.kubernetes.io/instance-type": "eklet"},
}


def test_agent_and_installer_run_only_on_opted_in_linux_nodes() -> None:
    """The first apply touches no node; the operator opts nodes in (canary), never a virtual
    or Windows node."""
    docs = kustomize(DAEMONSET)
    for name in ("p2p-mirror-agent", "p2p-mirror-install"):
        ds = by_kind(docs, "DaemonSet", name)
        admitted = {node for node, labels in NODES.items() if schedulable_on(ds, labels)}
        assert admitted == {"opted-in"}, name
    uninstall = by_kind(kustomize(DAEMONSET / "uninstall"), "DaemonSet", "p2p-mirror-uninstall")
    admitted = {node for node, labels in NODES.items() if schedulable_on(uninstall, labels)}
    assert admitted == {"opted-in", "not labelled", "label false"}
    readme = (DAEMONSET / "README.md").read_text()
    assert "## Canary" in readme and "kubectl label node NODE p2p-mirror.io/enabled=true" in readme


def test_installer_defaults_to_containerd_and_only_it_shares_host_pids() -> None:
    docs = kustomize(DAEMONSET)
    install = by_kind(docs, "DaemonSet", "p2p-mirror-install")
    command = container(install, "install", init=True)["command"]
    assert command[command.index("--runtime") + 1] == "containerd"
    # A rolled-back install is not retried in a loop: its next start exits 0 and idles.
    assert command[command.index("--skipped-exit-code") + 1] == "0"
    assert pod_spec(install)["hostPID"] is True
    for d in docs:
        if d["kind"] in ("DaemonSet", "StatefulSet") and d is not install:
            assert not pod_spec(d).get("hostPID"), d["metadata"]["name"]
            for c in pod_spec(d)["containers"] + pod_spec(d).get("initContainers", []):
                assert not c.get("securityContext", {}).get("privileged"), c["name"]
    uninstall = by_kind(kustomize(DAEMONSET / "uninstall"), "DaemonSet", "p2p-mirror-uninstall")
    assert pod_spec(uninstall)["priorityClassName"] == "system-node-critical"


# --- what each role is started with (issues 19, 21, 22 items 8-10) ---


HOST_IP, POD_IP = "10.20.0.7", "10.244.3.9"


def role_config(workload: dict[str, Any], name: str, docs: list[dict[str, Any]],
                tmp_path: Path, cls: type) -> Any:
    """The config the role really runs with: its ConfigMap file plus its container args after
    the kubelet's $(VAR) expansion (downward API values made up), parsed by the CLI's own
    click command and load_config, as `p2p-mirror ROLE` would."""
    from p2p_mirror.cli import main as cli
    from p2p_mirror.core.config import load_config as load

    c = container(workload, name)
    values = {"HOST_IP": HOST_IP, "POD_IP": POD_IP, "POD_NAMESPACE": "kube-system"}
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in c.get("env", [])
           if "valueFrom" in e}
    for var in re.findall(r"\$\((\w+)\)", " ".join(c["args"])):
        assert var in env, f"{name}: $({var}) is not set from the downward API"
    assert env.get("HOST_IP", "status.hostIP") == "status.hostIP"
    assert env.get("POD_IP", "status.podIP") == "status.podIP"
    assert env.get("POD_NAMESPACE", "metadata.namespace") == "metadata.namespace"
    args = [re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], a) for a in c["args"]]
    command, rest = args[0], args[1:]
    config_path = Path(rest[rest.index("--config") + 1])
    mount = next(m for m in c["volumeMounts"] if config_path.is_relative_to(m["mountPath"]))
    volume = next(v for v in pod_spec(workload)["volumes"] if v["name"] == mount["name"])
    cm = next(d for d in docs if d["kind"] == "ConfigMap"
              and d["metadata"]["name"] == volume["configMap"]["name"])
    local = tmp_path / f"{name}.yaml"
    local.write_text(cm["data"][config_path.name])
    rest[rest.index("--config") + 1] = str(local)
    ctx = cli.commands[command].make_context(command, rest)
    params = dict(ctx.params)
    params.pop("config")
    return load(cls, local, params)


def mounted_secret(workload: dict[str, Any], name: str, path: Path) -> dict[str, Any]:
    """The Secret volume that provides ``path`` in container ``name``."""
    c = container(workload, name)
    mount = next(m for m in c["volumeMounts"] if path.is_relative_to(m["mountPath"]))
    volume = next(v for v in pod_spec(workload)["volumes"] if v["name"] == mount["name"])
    assert "secret" in volume, f"{path} is not from a Secret"
    rel = str(path.relative_to(mount["mountPath"]))
    assert [i["path"] for i in volume["secret"]["items"]] == [rel]
    return volume["secret"]


def test_roles_run_with_the_node_address_seeder_set_trackers_and_cluster_secret(
        tmp_path: Path) -> None:
    docs = kustomize(DAEMONSET)
    agent_ds = by_kind(docs, "DaemonSet", "p2p-mirror-agent")
    seeder_sts = by_kind(docs, "StatefulSet", "p2p-mirror-seeder")
    tracker_sts = by_kind(docs, "StatefulSet", "p2p-mirror-tracker")
    agent = role_config(agent_ds, "agent", docs, tmp_path, AgentConfig)
    seeder = role_config(seeder_sts, "seeder", docs, tmp_path, SeederConfig)
    tracker = role_config(tracker_sts, "tracker", docs, tmp_path, TrackerConfig)

    # Issue 21: the seeder set by its headless Service, every tracker by its stable name,
    # node addresses announced.
    seeder_svc = by_kind(docs, "Service", seeder_sts["spec"]["serviceName"])
    tracker_svc = by_kind(docs, "Service", tracker_sts["spec"]["serviceName"])
    assert seeder_svc["spec"]["clusterIP"] == "None" == tracker_svc["spec"]["clusterIP"]
    assert agent.seeder == [f"http://{seeder_svc['metadata']['name']}.kube-system.svc:5005"]
    assert seeder.tracker == [
        f"udp://p2p-mirror-tracker-{i}.{tracker_svc['metadata']['name']}.kube-system.svc:6969"
        "/announce" for i in range(tracker_sts["spec"]["replicas"])]
    # the seeders announce over UDP (BEP 15): the Service and the NetworkPolicy carry it
    udp = {"port": 6969, "protocol": "UDP"}
    assert any(p["port"] == 6969 and p["protocol"] == "UDP" for p in tracker_svc["spec"]["ports"])
    ports_in = by_kind(docs, "NetworkPolicy", "p2p-mirror-tracker")["spec"]["ingress"][0]["ports"]
    assert udp in ports_in and {"port": 6969, "protocol": "TCP"} in ports_in
    assert tracker_sts["spec"]["replicas"] >= 2
    assert agent.announce_ip == HOST_IP and seeder.announce_ip == POD_IP
    # Issue 22 item 9: metrics on the node address, a host port Prometheus can reach.
    assert str(agent.metrics_listen) == f"{HOST_IP}:5006"
    ports = {p["containerPort"]: p for p in container(agent_ds, "agent")["ports"]}
    assert ports[5006]["hostPort"] == 5006
    # Issue 19: every role has the cluster secret, from the one Secret, readable by uid 10001.
    for workload, name, cfg in ((agent_ds, "agent", agent), (seeder_sts, "seeder", seeder),
                                (tracker_sts, "tracker", tracker)):
        assert cfg.cluster_secret is not None, name
        secret = mounted_secret(workload, name, cfg.cluster_secret)
        assert secret["secretName"] == "p2p-mirror-cluster-secret"
        assert not secret.get("optional"), "a role must not start without the secret"
        assert secret["defaultMode"] & 0o040 and not secret["defaultMode"] & 0o007
        assert pod_spec(workload)["securityContext"]["fsGroup"] == 10001
        assert container(workload, name)["securityContext"]["runAsUser"] == 10001
    readme = (DAEMONSET / "README.md").read_text()
    assert "create secret generic p2p-mirror-cluster-secret" in readme


def test_seeder_cache_survives_restarts_and_is_never_evicted(tmp_path: Path) -> None:
    """Issue 22 item 8: a capped cache on the node's disk, the container's own writes
    requested, no unbounded emptyDir."""
    docs = kustomize(DAEMONSET)
    sts = by_kind(docs, "StatefulSet", "p2p-mirror-seeder")
    seeder = role_config(sts, "seeder", docs, tmp_path, SeederConfig)
    c = container(sts, "seeder")
    mount = next(m for m in c["volumeMounts"] if m["mountPath"] == str(seeder.data_dir))
    volume = next(v for v in pod_spec(sts)["volumes"] if v["name"] == mount["name"])
    assert volume["hostPath"]["path"] == str(seeder.data_dir)
    assert seeder.cache_max_bytes > 0 and seeder.min_free_disk > 0
    assert quantity(c["resources"]["requests"]["ephemeral-storage"]) > 0
    for v in pod_spec(sts)["volumes"]:
        if "emptyDir" in v:
            assert v["emptyDir"].get("medium") == "Memory" and v["emptyDir"]["sizeLimit"]
    # Each replica on its own node, so each hostPath cache is that replica's own.
    anti = pod_spec(sts)["affinity"]["podAntiAffinity"]
    required = anti["requiredDuringSchedulingIgnoredDuringExecution"]
    assert required[0]["topologyKey"] == "kubernetes.io/hostname"


def test_network_policies_admit_only_node_addresses_to_seeders_and_trackers() -> None:
    docs = kustomize(DAEMONSET)
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    covered: dict[str, set[int]] = {}
    for policy in policies:
        component = policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        for rule in policy["spec"]["ingress"]:
            assert rule.get("from"), "a rule without `from` admits everyone"
            for peer in rule["from"]:
                assert set(peer) <= {"ipBlock", "podSelector"}, peer
                if "podSelector" in peer:
                    assert peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == \
                        "p2p-mirror"
                else:
                    assert not ipaddress.ip_network(peer["ipBlock"]["cidr"]).is_global
            covered.setdefault(component, set()).update(p["port"] for p in rule["ports"])
    assert covered == {"seeder": {5005, 6882}, "tracker": {6969}}
    for name, component in (("p2p-mirror-seeder", "seeder"), ("p2p-mirror-tracker", "tracker")):
        sts = by_kind(docs, "StatefulSet", name)
        assert {p["containerPort"] for p in container(sts, component)["ports"]} == \
            covered[component]
    # The production example narrows the ipBlocks to its node subnet.
    for policy in (d for d in kustomize(PRODUCTION) if d["kind"] == "NetworkPolicy"
                   and d["metadata"]["name"] != "p2p-mirror-metrics"):
        blocks = [p["ipBlock"]["cidr"] for p in policy["spec"]["ingress"][0]["from"]
                  if "ipBlock" in p]
        assert blocks == ["10.20.0.0/16"]


def table_ports(readme: Path) -> set[int]:
    return {int(m) for m in re.findall(r"^\| (\d+) \|", readme.read_text(), re.M)}


def test_every_port_is_in_the_firewall_tables() -> None:
    docs = kustomize(DAEMONSET) + kustomize(PRODUCTION)
    ports = {5004, 5003}  # loopback: the mirror and the dockerd proxy
    for d in docs:
        if d["kind"] in ("DaemonSet", "StatefulSet"):
            for c in pod_spec(d)["containers"]:
                ports.update(p["containerPort"] for p in c.get("ports", []))
    assert ports == {5003, 5004, 5005, 5006, 6881, 6882, 6969}
    for readme in (DAEMONSET / "README.md", ANSIBLE / "README.md"):
        assert ports <= table_ports(readme), readme


def test_optional_parts_stay_out_of_the_default(tmp_path: Path) -> None:
    default = kustomize(DAEMONSET)
    production = kustomize(PRODUCTION)
    assert not [d for d in default if d["kind"] == "ServiceMonitor"]
    monitor = by_kind(production, "ServiceMonitor", "p2p-mirror")
    scraped = {e["port"] for e in monitor["spec"]["endpoints"]}
    metrics_svc = by_kind(production, "Service", "p2p-mirror-agent-metrics")
    assert metrics_svc["spec"]["ports"][0]["port"] == 5006 and "metrics" in scraped
    assert "http" in scraped  # seeders' and trackers' /metrics on their API ports
    scrape_policy = by_kind(production, "NetworkPolicy", "p2p-mirror-metrics")
    (rule,) = scrape_policy["spec"]["ingress"]
    assert {p["port"] for p in rule["ports"]} == {5005, 6969}
    assert [set(peer) for peer in rule["from"]] == [{"namespaceSelector"}]
    # The seeder's own registry credentials: a dockerconfigjson Secret, only when asked for.
    seeder = role_config(by_kind(production, "StatefulSet", "p2p-mirror-seeder"), "seeder",
                         production, tmp_path, SeederConfig)
    assert seeder.registry_auth is not None
    secret = mounted_secret(by_kind(production, "StatefulSet", "p2p-mirror-seeder"), "seeder",
                            seeder.registry_auth)
    assert secret["secretName"] == "p2p-mirror-registry-auth"
    assert secret["items"][0]["key"] == ".dockerconfigjson"
    default_seeder = role_config(by_kind(default, "StatefulSet", "p2p-mirror-seeder"), "seeder",
                                 default, tmp_path, SeederConfig)
    assert default_seeder.registry_auth is None
    assert by_kind(production, "StatefulSet", "p2p-mirror-seeder")["spec"]["replicas"] == 4


def test_image_is_qualified_and_pinned(tmp_path: Path) -> None:
    """Issue 22 item 10: a qualified image name, the base by digest, every dependency pinned
    in one constraints file that the image and the playbook both use."""
    for path in (DAEMONSET, DAEMONSET / "uninstall", PRODUCTION):
        for d in kustomize(path):
            if d["kind"] in ("DaemonSet", "StatefulSet"):
                spec = pod_spec(d)
                for c in spec["containers"] + spec.get("initContainers", []):
                    assert c["image"] == "ghcr.io/p2p-mirror/p2p-mirror:0.1.0", c["image"]
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=\S+:\S+@sha256:[0-9a-f]{64}$", dockerfile, re.M)
    assert "--constraint constraints.txt" in dockerfile
    assert re.search(r"^COPY .*constraints\.txt", dockerfile, re.M)
    defaults = (ANSIBLE / "roles/p2p_mirror/defaults/main.yml").read_text()
    assert "/constraints.txt" in defaults

    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not pinned: {line}"
            pins[canonical(name)] = version
    assert dependency_closure("p2p-mirror") <= set(pins)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dependency_closure(dist: str) -> set[str]:
    """Every distribution ``dist`` needs at run time on this Python (extras left out)."""
    from importlib import metadata

    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    env = default_environment()
    seen: set[str] = set()
    todo = [dist]
    while todo:
        for text in metadata.requires(todo.pop()) or []:
            req = Requirement(text)
            if req.marker and not req.marker.evaluate({**env, "extra": ""}):
                continue
            name = canonical(req.name)
            if name not in seen:
                seen.add(name)
                todo.append(name)
    return seen


@pytest.mark.parametrize(
    ("kind", "workload", "name", "cls"),
    [("DaemonSet", "p2p-mirror-agent", "agent", AgentConfig),
     ("StatefulSet", "p2p-mirror-seeder", "seeder", SeederConfig),
     ("StatefulSet", "p2p-mirror-tracker", "tracker", TrackerConfig)],
)
def test_configmaps_hold_valid_role_configs(kind: str, workload: str, name: str, cls: type,
                                           tmp_path: Path) -> None:
    """Each role's ConfigMap plus its arguments load with the real config class; the shipped
    segment_size is the default one."""
    docs = kustomize(DAEMONSET)
    cfg = role_config(by_kind(docs, kind, workload), name, docs, tmp_path, cls)
    if cls is SeederConfig:
        assert cfg.segment_size == SeederConfig.__dataclass_fields__["segment_size"].default
    # The workload mounts the generated (hash-suffixed) name, so a config edit rolls the pods.
    generated = [d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"
                 and d["metadata"]["name"].startswith(f"p2p-mirror-{name}-")]
    mounted = [v["configMap"]["name"] for v in pod_spec(by_kind(docs, kind, workload))["volumes"]
               if "configMap" in v]
    assert len(generated) == 1 and mounted == generated


@pytest.mark.integration
def test_init_containers_configure_and_restore_a_real_containerd() -> None:
    """The DaemonSet's install and uninstall commands, exactly as built, against a fake host
    root: the config stays a valid containerd config, containerd is restarted through nsenter
    and comes back, and uninstall restores every byte."""
    need("containerd")
    need("ctr")
    need("nsenter")
    install_cmd = container(by_kind(kustomize(DAEMONSET), "DaemonSet", "p2p-mirror-install"),
                            "install", init=True)["command"]
    uninstall_cmd = container(
        by_kind(kustomize(DAEMONSET / "uninstall"), "DaemonSet", "p2p-mirror-uninstall"),
        "uninstall", init=True)["command"]
    assert "/host" in install_cmd and "/host" in uninstall_cmd
    work = short_tmpdir("p2pk8s-")
    try:
        host = work / "host"
        make_host_root(host)
        before = snapshot(host)
        config = host / "etc/containerd/config.toml"
        with HostContainerd(host, work) as containerd:
            proc = run_in_pid_namespace(cli_argv(install_cmd, host), containerd.env())
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert containerd.calls() == ["restart containerd"]
            assert containerd.restarts == ["containerd"] and containerd.answers()

            text = config.read_text()
            assert SAMPLE_CONTAINERD_CONFIG.splitlines()[1] in text  # the user's comment kept
            doc = tomllib.loads(text)
            cri = doc["plugins"]["io.containerd.grpc.v1.cri"]
            assert cri["registry"]["config_path"] == "/etc/containerd/certs.d"
            assert cri["sandbox_image"] == "registry.k8s.io/pause:3.9"
            dumped = tomllib.loads(containerd_config_dump(config))
            dumped_cri = dumped["plugins"]["io.containerd.grpc.v1.cri"]
            assert dumped_cri["registry"]["config_path"] == "/etc/containerd/certs.d"
            assert dumped["oom_score"] == -999
            hosts = tomllib.loads((host / "etc/containerd/certs.d/_default/hosts.toml").read_text())
            assert list(hosts["host"]) == [MIRROR]
            assert hosts["host"][MIRROR]["capabilities"] == ["pull", "resolve"]

            # A second start of the pod (node reboot, image update) changes nothing.
            proc = run_in_pid_namespace(cli_argv(install_cmd, host), containerd.env())
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert containerd.calls() == ["restart containerd"]

            proc = run_in_pid_namespace(cli_argv(uninstall_cmd, host), containerd.env())
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert containerd.calls() == ["restart containerd"] * 2
            assert containerd.answers()
        assert snapshot(host) == before
        containerd_config_dump(config)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- ansible --------------------------------------------------------------------------------


def test_ansible_lint_passes() -> None:
    proc = subprocess.run([need("ansible-lint"), "--offline", "--profile", "production"],
                          cwd=ANSIBLE, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]


def test_role_lists_only_platforms_it_supports() -> None:
    """Python 3.10+ (EL8/EL9 ship 3.6/3.9) and systemd 239+ (no Type=exec, which needs 240)."""
    meta = yaml.safe_load((ANSIBLE / "roles/p2p_mirror/meta/main.yml").read_text())
    assert {p["name"] for p in meta["galaxy_info"]["platforms"]} == {"Debian", "Ubuntu"}
    unit = (ANSIBLE / "roles/p2p_mirror/templates/p2p-mirror.service.j2").read_text()
    assert "Type=simple" in unit and "Type=exec" not in unit
    assert "MemoryMax=" in unit and "CPUQuota=" in unit


def test_agents_get_every_seeder_and_seeders_every_tracker(tmp_path: Path) -> None:
    """Issue 21 (ansible): the endpoints an agent and a seeder are configured with come from
    every host of the groups, at each host's advertised address; the agent announces its own."""
    need("ansible-playbook")
    local = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    inventory = {"all": {"hosts": {"a1": {**local, "ansible_host": "192.0.2.20"}}, "children": {
        "p2p_seeders": {"hosts": {
            "s1": {**local, "ansible_host": "192.0.2.11"},
            "s2": {**local, "ansible_host": "192.0.2.12", "p2p_mirror_seeder_port": 5015},
            "s3": {**local, "p2p_mirror_advertise_address": "10.0.0.9"}}},
        "p2p_trackers": {"hosts": {"t1": {**local, "ansible_host": "192.0.2.31"},
                                   "t2": {**local, "ansible_host": "192.0.2.32"}}},
    }}}
    (tmp_path / "inventory.yml").write_text(yaml.safe_dump(inventory))
    out = tmp_path / "endpoints.json"
    (tmp_path / "play.yml").write_text(yaml.safe_dump([{
        "hosts": "a1", "gather_facts": False, "tasks": [
            {"ansible.builtin.include_role": {"name": "p2p_mirror", "tasks_from": "endpoints"}},
            {"ansible.builtin.copy": {"dest": str(out), "mode": "0644", "content":
             "{{ {'seeders': p2p_mirror_seeder_urls, 'trackers': p2p_mirror_tracker_urls,"
             " 'ip': p2p_mirror_advertise_ip} | to_json }}"}}]}]))
    env = dict(os.environ, ANSIBLE_CONFIG=str(ANSIBLE / "ansible.cfg"),
               ANSIBLE_ROLES_PATH=str(ANSIBLE / "roles"), ANSIBLE_HOME=str(tmp_path / "home"),
               ANSIBLE_LOCAL_TEMP=str(tmp_path / "tmp"))
    proc = subprocess.run([need("ansible-playbook"), "-i", str(tmp_path / "inventory.yml"),
                           str(tmp_path / "play.yml")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["seeders"] == ["http://192.0.2.11:5005", "http://192.0.2.12:5015",
                              "http://10.0.0.9:5005"]
    assert got["trackers"] == ["udp://192.0.2.31:6969/announce",
                               "udp://192.0.2.32:6969/announce"]
    assert got["ip"] == "192.0.2.20"


def test_example_inventory_lists_the_roles() -> None:
    inventory = yaml.safe_load((ANSIBLE / "inventory/example/hosts.yml").read_text())
    children = inventory["all"]["children"]
    assert children["p2p_trackers"]["hosts"] and children["p2p_seeders"]["hosts"]


_RECAP = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)",
                    re.M)


class Playbook:
    """ansible-playbook with the test's inventory and extra vars; logs kept in ``work``."""

    def __init__(self, work: Path, inventory: dict[str, Any], extra_vars: dict[str, Any],
                 env: dict[str, str]) -> None:
        self.work = work
        self.inventory = work / "inventory.yml"
        self.inventory.write_text(yaml.safe_dump(inventory))
        self.vars = work / "vars.yml"
        self.vars.write_text(yaml.safe_dump(extra_vars))
        self.env = dict(env, ANSIBLE_CONFIG=str(ANSIBLE / "ansible.cfg"),
                        ANSIBLE_HOME=str(work / "ansible-home"),
                        ANSIBLE_LOCAL_TEMP=str(work / "ansible-tmp"),
                        ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0")
        self.runs = 0
        self.seconds: list[float] = []

    def run(self, playbook: str, *args: str) -> int:
        """Run; returns the number of changed tasks (the run must succeed)."""
        self.runs += 1
        started = time.monotonic()
        proc = subprocess.run(
            [need("ansible-playbook"), "-i", str(self.inventory), "-e", f"@{self.vars}",
             *args, playbook],
            cwd=ANSIBLE, env=self.env, capture_output=True, text=True, timeout=900,
        )
        self.seconds.append(round(time.monotonic() - started, 1))
        print(f"ansible-playbook {playbook} {' '.join(args)}: {self.seconds[-1]} s")
        log = self.work / f"run{self.runs}-{playbook}.log"
        log.write_text(proc.stdout + proc.stderr)
        assert proc.returncode == 0, f"{playbook} {args} failed:\n{proc.stdout[-6000:]}"
        recap = _RECAP.findall(proc.stdout)
        assert len(recap) >= 1 and all(r[0] == "node1" for r in recap), proc.stdout[-2000:]
        assert all(r[3] == "0" and r[4] == "0" for r in recap)
        return sum(int(r[2]) for r in recap)


def copy_checkout(dest: Path, version: str | None = None) -> Path:
    """A frozen copy of the package sources (and pins), optionally renumbered ``version``."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "constraints.txt"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, dest / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
    for package in ("p2p_mirror",):
        shutil.copytree(REPO / package, dest / package, ignore=ignore)
    if version is not None:
        for rel, pattern in (("pyproject.toml", r'(?m)^version = "[^"]+"'),
                             ("p2p_mirror/__init__.py", r'(?m)^__version__ = "[^"]+"')):
            path = dest / rel
            text, count = re.subn(pattern, pattern.split(" = ")[0].removeprefix("(?m)^")
                                  + f' = "{version}"', path.read_text())
            assert count == 1, rel
            path.write_text(text)
    return dest


SERVICES = ("p2p-mirror-agent", "p2p-mirror-seeder", "p2p-mirror-tracker")
HEALTH = ("http://127.0.0.1:5004/healthz", "http://127.0.0.1:5005/healthz",
          "http://127.0.0.1:6969/healthz")
# What the playbook may touch on a host and uninstall must give back byte for byte.
HOST_PATHS = ("etc/containerd", "etc/systemd/system", "etc/p2p-mirror", "opt/p2p-mirror",
              "var/lib/p2p-mirror", "etc/passwd", "etc/group")


@pytest.mark.integration
def test_playbook_on_a_systemd_host() -> None:
    """site.yml and uninstall.yml against a booted Debian host (systemd-nspawn, no network,
    so no package index): --check on the fresh host changes nothing, the first run starts
    every unit and containerd is restarted by systemd, a second run changes nothing, an
    upgrade restarts every service, uninstall gives every byte back."""
    for tool in ("mmdebstrap", "systemd-nspawn", "nsenter", "ansible-playbook"):
        need(tool)
    require_root()
    tarball = rootfs_tarball()
    with scratch_dir("p2psd-") as work, SystemdHost(tarball, work / "root") as host:
        root = host.root
        assert host.run("ls", "/sys/class/net").stdout.split() == ["lo"], "host must be offline"
        before = snapshot_paths(root, HOST_PATHS)
        assert "etc/containerd/config.toml" in before
        containerd_started = host.unit_property("containerd.service", "InvocationID")
        book = Playbook(work, {"all": {
            "hosts": {"node1": {"ansible_connection": "nsenter",
                                "ansible_host": str(host.init_pid),
                                "ansible_python_interpreter": "/usr/bin/python3",
                                "ansible_become": False}},
            "children": {"p2p_trackers": {"hosts": {"node1": {}}},
                         "p2p_seeders": {"hosts": {"node1": {}}}},
        }}, {
            "p2p_mirror_source": str(copy_checkout(work / "src")),
            # Kept between runs: a wheelhouse is rebuilt only when its inputs change.
            "p2p_mirror_wheel_cache": str(WHEELHOUSE_CACHE),
            "p2p_mirror_cluster_secret_src": str(work / "cluster-secret"),
            "p2p_mirror_advertise_address": "127.0.0.1",
            "p2p_mirror_registries": {"registry.example.test": "http://127.0.0.1:5000"},
            "p2p_mirror_health_delay": 1,
            "p2p_mirror_runtime_health_timeout": 30,
        }, dict(os.environ, ANSIBLE_CONNECTION_PLUGINS=str(NSENTER_PLUGINS),
                ANSIBLE_PIPELINING="True"))

        # --check --diff on a fresh host: reports changes, makes none.
        assert book.run("site.yml", "--check", "--diff") > 0
        assert snapshot_paths(root, HOST_PATHS) == before
        assert host.unit_property("containerd.service", "InvocationID") == containerd_started

        assert book.run("site.yml") > 0
        for service, url in zip(SERVICES, HEALTH, strict=True):
            assert host.run("systemctl", "is-active", service).stdout.strip() == "active"
            assert host.run("systemctl", "is-enabled", service).stdout.strip() == "enabled"
            assert host.unit_property(service, "MemoryMax").isdigit(), service
            assert host.unit_property(service, "CPUQuotaPerSecUSec") != "infinity", service
            verify = host.run("systemd-analyze", "verify", "--man=no",
                              f"/etc/systemd/system/{service}.service", check=False)
            assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
            assert host.http_status(url) == 200, url
        # containerd was pointed at the agent and restarted by the host's systemd.
        containerd_configured = host.unit_property("containerd.service", "InvocationID")
        assert containerd_configured != containerd_started
        assert host.run("ctr", "version").returncode == 0
        hosts = root / "etc/containerd/certs.d/registry.example.test/hosts.toml"
        assert list(tomllib.loads(hosts.read_text())["host"]) == [MIRROR]
        # The shipped role configs load with the real config classes; the secret is set.
        secret = root / "etc/p2p-mirror/cluster-secret"
        assert secret.stat().st_mode & 0o777 == 0o600
        assert (work / "cluster-secret").stat().st_mode & 0o777 == 0o600
        assert secret.read_text().strip() == (work / "cluster-secret").read_text().strip()
        assert len(secret.read_text().strip()) == 64
        configs = {}
        for role, cls in (("agent", AgentConfig), ("seeder", SeederConfig),
                          ("tracker", TrackerConfig)):
            configs[role] = load_config(cls, root / f"etc/p2p-mirror/{role}.yaml")
            assert configs[role].cluster_secret == Path("/etc/p2p-mirror/cluster-secret")
        agent, seeder = configs["agent"], configs["seeder"]
        assert agent.seeder == ["http://127.0.0.1:5005"]
        assert agent.announce_ip == "127.0.0.1" and str(agent.metrics_listen) == "127.0.0.1:5006"
        assert seeder.tracker == ["udp://127.0.0.1:6969/announce"]
        assert seeder.segment_size == SeederConfig.__dataclass_fields__["segment_size"].default

        assert book.run("site.yml") == 0, "a second run must change nothing"

        # An upgrade (a new version from a changed checkout) restarts every service on the
        # host, the agent on this tracker and seeder host included.
        started = {s: host.unit_property(s, "InvocationID") for s in SERVICES}
        book.vars.write_text(book.vars.read_text().replace(
            str(work / "src"), str(copy_checkout(work / "src-next", version="0.1.1"))))
        assert book.run("site.yml") > 0
        version = host.run("/opt/p2p-mirror/venv/bin/p2p-mirror", "--version").stdout
        assert "0.1.1" in version
        for service, url in zip(SERVICES, HEALTH, strict=True):
            assert host.unit_property(service, "InvocationID") != started[service], service
            assert host.http_status(url) == 200, url
        assert host.unit_property("containerd.service", "InvocationID") == containerd_configured

        assert book.run("uninstall.yml") > 0
        assert snapshot_paths(root, HOST_PATHS) == before
        for service in SERVICES:
            listed = host.run("systemctl", "list-unit-files", f"{service}.service",
                              check=False).stdout
            assert f"{service}.service" not in listed
            assert host.run("systemctl", "is-active", service, check=False).stdout.strip() in (
                "inactive", "unknown")
        assert host.unit_property("containerd.service", "InvocationID") != containerd_configured
        assert host.run("ctr", "version").returncode == 0
