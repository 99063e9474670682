"""`p2p-mirror status`: a role's health and counters, and a failed install on the node."""

from __future__ import annotations

from http.server import BaseHTTPRequestHandler
from pathlib import Path

from click.testing import CliRunner
from support.fakes import http_server

from p2p_mirror.cli import main
from p2p_mirror.installer.base import Change
from p2p_mirror.installer.failure import record_failure


class Role(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        body = b"ok\n" if self.path == "/healthz" else (
            b"# TYPE p2p_mirror_served_bytes_total counter\np2p_mirror_served_bytes_total 2048\n")
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_status_shows_health_and_counters(tmp_path: Path) -> None:
    with http_server(Role) as url:
        res = CliRunner().invoke(main, ["status", "--agent", url, "--root", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert f"{url}: ok" in res.output
    assert "p2p_mirror_served_bytes_total" in res.output and "2.0 KiB" in res.output


def test_status_reports_a_failed_install_and_exits_1(tmp_path: Path) -> None:
    record_failure(tmp_path, [Change("/etc/containerd/config.toml", b"x")], ["containerd"],
                   "containerd did not become healthy", [])
    with http_server(Role) as url:
        res = CliRunner().invoke(main, ["status", "--agent", url, "--root", str(tmp_path)])
    assert res.exit_code == 1
    assert "installer:" in res.output and "install --force" in res.output


def test_status_of_an_unreachable_role_exits_1(tmp_path: Path) -> None:
    res = CliRunner().invoke(main, ["status", "--agent", "http://127.0.0.1:9",
                                    "--root", str(tmp_path), "--timeout", "2"])
    assert res.exit_code == 1
    assert "unreachable" in res.output
