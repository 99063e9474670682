"""The kubelet's path: CRI ``ImageService.PullImage`` over containerd's socket.

``ctr --hosts-dir`` (the other tests) hands containerd the hosts directory itself; the kubelet
does not: it calls the CRI plugin, which reads ``config_path`` from config.toml. So here the
installer writes a fake host root (``--root``, as in the DaemonSet), and containerd runs in
its own mount namespace where that root's ``/etc/containerd`` is the real path
(``support/bind_exec.py``): it sees ``config_path = "/etc/containerd/certs.d"`` exactly as a
node's containerd does. The fallback server is a dead port, so the image can only come
through the agent. The CRI messages come from a minimal proto declared here, compiled with
grpcio-tools' protoc; containerd 1.6 and 2.x both serve ``runtime.v1``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from click.testing import CliRunner
from support import SUPPORT, require_binaries, require_root
from support.installer import running_node

from lab.containerd import Containerd
from lab.images import PushedImage
from lab.procs import free_port
from lab.registry import Registry
from lab.stack import LocalStack
from p2p_mirror.cli.install import install, uninstall

pytestmark = pytest.mark.integration

NAME = "registry.example.test"
BIND_EXEC = SUPPORT / "bind_exec.py"
CRI_NAMESPACE = "k8s.io"
CRI_PROTO = """\
syntax = "proto3";
// The part of the CRI (k8s.io/cri-api, runtime/v1/api.proto) this test calls; field
// numbers as there.
package runtime.v1;

message ImageSpec {
  string image = 1;
  map<string, string> annotations = 2;
}
message AuthConfig {
  string username = 1;
  string password = 2;
}
message PullImageRequest {
  ImageSpec image = 1;
  AuthConfig auth = 2;
}
message PullImageResponse { string image_ref = 1; }
message ImageStatusRequest {
  ImageSpec image = 1;
  bool verbose = 2;
}
message Image {
  string id = 1;
  repeated string repo_tags = 2;
  repeated string repo_digests = 3;
  uint64 size = 4;
}
message ImageStatusResponse { Image image = 1; }
"""


def cri_messages(workdir: Path) -> ModuleType:
    """``cri_images_pb2`` compiled from CRI_PROTO with grpcio-tools' protoc."""
    pytest.importorskip("grpc", reason="grpcio is a test dependency (pip install -e .[test])")
    protoc = pytest.importorskip("grpc_tools.protoc", reason="grpcio-tools is a test dependency")
    (workdir / "cri_images.proto").write_text(CRI_PROTO)
    rc = protoc.main(["protoc", f"-I{workdir}", f"--python_out={workdir}", "cri_images.proto"])
    assert rc == 0, "protoc failed on CRI_PROTO"
    sys.path.insert(0, str(workdir))
    try:
        return importlib.import_module("cri_images_pb2")
    finally:
        sys.path.remove(str(workdir))


class HostContainerd(Containerd):
    """A containerd that sees ``host_etc`` at ``/etc/containerd`` (its own mount namespace)."""

    def __init__(self, host_etc: Path, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.host_etc = host_etc

    def argv(self) -> list[str]:
        return [sys.executable, str(BIND_EXEC), str(self.host_etc), "/etc/containerd", "--",
                *super().argv()]


class Cri:
    """The CRI ImageService over containerd's unix socket, as the kubelet calls it."""

    def __init__(self, socket: Path, pb: ModuleType) -> None:
        import grpc

        self.pb = pb
        self.channel = grpc.insecure_channel(f"unix://{socket}")
        prefix = "/runtime.v1.ImageService"
        self._pull = self.channel.unary_unary(
            f"{prefix}/PullImage", request_serializer=pb.PullImageRequest.SerializeToString,
            response_deserializer=pb.PullImageResponse.FromString)
        self._status = self.channel.unary_unary(
            f"{prefix}/ImageStatus", request_serializer=pb.ImageStatusRequest.SerializeToString,
            response_deserializer=pb.ImageStatusResponse.FromString)

    def pull(self, ref: str, timeout: float = 120) -> str:
        return self._pull(self.pb.PullImageRequest(image=self.pb.ImageSpec(image=ref)),
                          timeout=timeout).image_ref

    def status(self, ref: str):  # noqa: ANN201 - a generated message type
        return self._status(self.pb.ImageStatusRequest(image=self.pb.ImageSpec(image=ref)),
                            timeout=30).image

    def close(self) -> None:
        self.channel.close()


@pytest.fixture
def cri_node(tmp_path: Path) -> Iterator[tuple[Path, HostContainerd]]:
    """A host root whose /etc/containerd is, for the running containerd, /etc/containerd."""
    require_root()
    require_binaries("containerd", "ctr")
    if not Path("/etc/containerd").is_dir():
        pytest.skip("needs /etc/containerd as a mount point (apt-get install containerd)")
    with running_node(tmp_path, lambda workdir, config, text: HostContainerd(
            config.parent, workdir, config_toml=text, config_path=config,
            namespace=CRI_NAMESPACE)) as node:  # fmt: skip
        yield node


def test_cri_pull_image_goes_through_the_agent_with_the_installed_config(
    cri_node: tuple[Path, HostContainerd], registry: Registry, image: PushedImage,
    tmp_path: Path,
) -> None:
    root, ctd = cri_node
    pb = cri_messages(tmp_path)
    ref = f"{NAME}/{image.name}"
    layer_bytes = sum(layer.size for layer in image.layout.layers)
    with LocalStack(tmp_path / "stack", {NAME: registry.url}, segment_size="2MiB") as stack:
        agent = stack.add_agent("agent")
        dead = f"http://127.0.0.1:{free_port()}"  # the fallback: only the agent can serve
        res = CliRunner().invoke(install, [
            "--root", str(root), "--runtime", "containerd", "--mirror", agent.url,
            "--registry", f"{NAME}={dead}", "--containerd-socket", str(ctd.socket),
            "--no-restart",
        ])
        assert res.exit_code == 0, res.output
        ctd.restart()  # the node's systemctl restart: containerd re-reads config.toml
        assert '"/etc/containerd/certs.d"' in ctd.config_dump()
        cri = Cri(ctd.socket, pb)
        try:
            mark = registry.mark()
            image_id = cri.pull(ref)
            status = cri.status(ref)
        finally:
            cri.close()
        try:
            assert image_id == status.id and image_id.startswith("sha256:")
            assert ref in status.repo_tags
            assert f"{NAME}/{image.repo}@{image.layout.manifest_digest}" in status.repo_digests
            assert ctd.image_digest(ref) == image.layout.manifest_digest  # in k8s.io
            sources = agent.blob_sources()
            assert sum(sources.values()) >= layer_bytes, sources  # every layer via the agent
            registry.settle()
            agents = {r.user_agent for r in registry.requests(since=mark)}
            assert not any("containerd" in a for a in agents), agents
        except BaseException:
            stack.dump_logs()
            raise
    res = CliRunner().invoke(uninstall, ["--root", str(root), "--no-restart"])
    assert res.exit_code == 0, res.output
