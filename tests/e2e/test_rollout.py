"""Roll-out: Kubernetes manifests, the image's Dockerfile, the ansible playbook.

The manifests are built with kubectl kustomize and validated offline against the Kubernetes
schemas; the install/uninstall init containers' exact commands run against a fake host root
whose containerd is real (restarted through a fake systemctl). The playbook really runs
against localhost under a temp root, twice (the second run changes nothing), then uninstalls.
"""

from __future__ import annotations

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


@pytest.mark.parametrize("path", [DAEMONSET, DAEMONSET / "uninstall"], ids=["install", "uninstall"])
def test_manifests_build_and_validate_offline(path: Path, tmp_path: Path) -> None:
    need("kubernetes-validate")
    built = subprocess.run([need("kubectl"), "kustomize", str(path)], check=True,
                           capture_output=True, text=True).stdout
    docs = [d for d in yaml.safe_load_all(built) if d]
    assert docs and all(d["metadata"]["namespace"] == "kube-system" for d in docs)
    manifest = tmp_path / "built.yaml"
    manifest.write_text(built)
    for version in ("1.29.0", None):
        argv = ["kubernetes-validate", "--strict", str(manifest)]
        if version:
            argv[1:1] = ["-k", version]
        proc = subprocess.run(argv, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert proc.stdout.count("passed") == len(docs), proc.stdout


def test_manifests_match_the_addon_layout() -> None:
    docs = kustomize(DAEMONSET)
    agent = by_kind(docs, "DaemonSet", "p2p-mirror-agent")
    seeder = by_kind(docs, "Deployment", "p2p-mirror-seeder")
    tracker = by_kind(docs, "Deployment", "p2p-mirror-tracker")
    by_kind(docs, "Service", "p2p-mirror-seeder")
    by_kind(docs, "Service", "p2p-mirror-tracker")
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

    assert seeder["spec"]["template"]["spec"]["nodeSelector"] == {"proxy": "p2p-proxy"}
    assert tracker["spec"]["template"]["spec"]["nodeSelector"] == {"tracker": "p2p-tracker"}
    pod = agent["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["hostPID"] is True
    cache = next(v for v in pod["volumes"] if v["name"] == "cache")
    assert cache["hostPath"]["path"] == "/var/lib/p2p-mirror/agent"
    assert container(agent, "agent")["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize(
    ("configmap", "key", "cls"),
    [("p2p-mirror-agent", "agent.yaml", AgentConfig),
     ("p2p-mirror-seeder", "seeder.yaml", SeederConfig),
     ("p2p-mirror-tracker", "tracker.yaml", TrackerConfig)],
)
def test_configmaps_hold_valid_role_configs(configmap: str, key: str, cls: type,
                                           tmp_path: Path) -> None:
    docs = kustomize(DAEMONSET)
    cm = next(d for d in docs if d["kind"] == "ConfigMap"
              and d["metadata"]["name"].startswith(configmap + "-"))
    path = tmp_path / key
    path.write_text(cm["data"][key])
    load_config(cls, path)
    # The workload mounts the generated (hash-suffixed) name, so a config edit rolls the pods.
    mounted = [v["configMap"]["name"] for d in docs if d["kind"] in ("DaemonSet", "Deployment")
               for v in d["spec"]["template"]["spec"]["volumes"] if "configMap" in v]
    assert cm["metadata"]["name"] in mounted


@pytest.mark.integration
def test_init_containers_configure_and_restore_a_real_containerd() -> None:
    """The DaemonSet's install and uninstall commands, exactly as built, against a fake host
    root: the config stays a valid containerd config, containerd is restarted through nsenter
    and comes back, and uninstall restores every byte."""
    need("containerd")
    need("ctr")
    need("nsenter")
    install_cmd = container(by_kind(kustomize(DAEMONSET), "DaemonSet", "p2p-mirror-agent"),
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
            "p2p_mirror_wheel_cache": str(work / "wheelhouses"),
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
        assert seeder.tracker == ["http://127.0.0.1:6969/announce"]
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
            listed = host.run("systemctl", "list-unit-files", f"{service}.service").stdout
            assert f"{service}.service" not in listed
            assert host.run("systemctl", "is-active", service, check=False).stdout.strip() in (
                "inactive", "unknown")
        assert host.unit_property("containerd.service", "InvocationID") != containerd_configured
        assert host.run("ctr", "version").returncode == 0
