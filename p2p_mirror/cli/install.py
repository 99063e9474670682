"""``p2p-mirror install`` / ``uninstall``: click commands the main CLI group adds."""

from __future__ import annotations

from pathlib import Path

import click

from p2p_mirror.core.config import Upstream, parse_registry_flag, parse_url
from p2p_mirror.installer import containerd_version, engine
from p2p_mirror.installer.base import InstallError
from p2p_mirror.installer.dockerd import DEFAULT_AGENT_DATA_DIR, DEFAULT_PROXY, parse_no_proxy
from p2p_mirror.installer.lock import LockBusy
from p2p_mirror.installer.restart import RestartError

HUB_NOTE = (
    "dockerd mirrors Docker Hub (docker.io) images only through registry-mirrors; the other "
    "--registry names go through the agent's proxy (HTTPS_PROXY drop-in, agent CA in "
    "/etc/docker/certs.d/<registry>/ca.crt). See docs/dockerd.md."
)
EXIT_CODES = (
    "Exit codes: 0 done or nothing to do; 1 rolled back (the failure is recorded in "
    "/var/lib/p2p-mirror/installer/failed.json); 2 refused, bad input, nothing changed; "
    "3 not retried: this exact install was rolled back before (--force retries it)."
)


def _registries(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]):
    try:
        return [parse_registry_flag(v) for v in value]
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _no_proxy(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> list[str]:
    try:
        return parse_no_proxy(list(value))
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _owner(ctx: click.Context, param: click.Parameter, value: str | None):
    if value is None:
        return None
    uid, _, gid = value.partition(":")
    if not uid.isdigit() or (gid and not gid.isdigit()):
        raise click.BadParameter(f"expected UID[:GID] numbers, got {value!r}")
    return int(uid), int(gid or uid)


def _version(ctx: click.Context, param: click.Parameter, value: str | None):
    if value is None:
        return None
    version = containerd_version.parse_version(f" {value}")
    if version is None:
        raise click.BadParameter(f"{value!r} is not a version like 1.6.20")
    return version


def _url(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        return parse_url(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


root_option = click.option(
    "--root", type=click.Path(file_okay=False, path_type=Path), default=Path("/"),
    show_default=True, help="Host root all paths are under (the DaemonSet mounts it at /host).",
)
restart_option = click.option(
    "--restart-command", metavar="CMD",
    help="Restart command instead of `systemctl restart UNIT`; split like a shell would "
         "(no shell runs), `{unit}` becomes containerd or docker.",
)
no_restart_option = click.option(
    "--no-restart", is_flag=True, help="Write the files but do not restart the runtime."
)
health_option = click.option(
    "--health-timeout", type=click.FloatRange(min=0, max=3600), default=60.0,
    show_default=True, metavar="SECONDS",
    help="How long the restarted runtime has to answer on its socket.",
)
containerd_socket_option = click.option(
    "--containerd-socket", type=click.Path(path_type=Path),
    help="containerd socket for the health check, taken as is [ROOT + config's grpc.address, "
         "else ROOT/run/containerd/containerd.sock].",
)
docker_socket_option = click.option(
    "--docker-socket", type=click.Path(path_type=Path),
    help="dockerd socket for the health check [ROOT/var/run/docker.sock].",
)
allow_dockerd_option = click.option(
    "--allow-dockerd-restart", is_flag=True,
    help="Restart dockerd even without live-restore in daemon.json (stops its containers).",
)
containerd_config_option = click.option(
    "--containerd-config", default="/etc/containerd/config.toml", show_default=True,
    metavar="PATH", help="containerd config file (a host path, under --root).",
)


def _run(fn, opts: engine.Options, skipped_exit_code: int = engine.SKIPPED) -> None:
    try:
        code = fn(opts, click.echo)
    except (InstallError, LockBusy, RestartError) as e:
        click.echo(f"error: {e}", err=True)
        raise SystemExit(engine.REFUSED) from None
    if code == engine.SKIPPED:
        code = skipped_exit_code
    if code:
        raise SystemExit(code)


@click.command(epilog=f"{HUB_NOTE}\n\n{EXIT_CODES}")
@root_option
@click.option("--runtime", type=click.Choice(["auto", "containerd", "dockerd"]), default="auto",
              show_default=True, help="Runtime to configure; auto: every one found under --root.")
@click.option("--mirror", default="http://127.0.0.1:5004", show_default=True, callback=_url,
              help="The node agent's URL.")
@click.option("--registry", "registries", multiple=True, metavar="NAME[=URL]",
              callback=_registries,
              help="Registry to send through the mirror (repeatable); URL is the fallback server "
                   "[https://NAME]. None given: every registry (containerd _default).")
@restart_option
@click.option("--dry-run", is_flag=True, help="Print the diff it would apply; change nothing.")
@no_restart_option
@health_option
@containerd_config_option
@containerd_socket_option
@click.option("--containerd-version", metavar="X.Y.Z", callback=_version,
              help="containerd's version, instead of asking `containerd --version` (or the "
                   "socket): before 1.6.17 it does not read certs.d/_default.")
@docker_socket_option
@click.option("--proxy", default=DEFAULT_PROXY, show_default=True, callback=_url,
              help="dockerd: the agent's proxy URL (its proxy_listen).")
@click.option("--no-proxy", "no_proxy", multiple=True, metavar="LIST", callback=_no_proxy,
              help="dockerd: hosts/CIDRs reached without the proxy (repeatable or comma "
                   "separated), e.g. the cluster's pod and service ranges; loopback always.")
@click.option("--agent-data-dir", default=DEFAULT_AGENT_DATA_DIR, show_default=True,
              metavar="PATH", help="dockerd: the agent's data_dir (a host path, under --root); "
                                   "its proxy CA is made there if missing.")
@click.option("--ca-cert", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="dockerd: use this CA certificate instead of the agent data dir's.")
@click.option("--agent-user", metavar="UID[:GID]", callback=_owner,
              help="dockerd: owner of a CA the installer makes (the agent's user) [installer's].")
@allow_dockerd_option
@click.option("--force", is_flag=True,
              help="Retry an install that was rolled back before (see exit code 3).")
@click.option("--skipped-exit-code", type=click.IntRange(0, 255), default=engine.SKIPPED,
              show_default=True, metavar="CODE",
              help="Exit code when this exact install was rolled back before and is not "
                   "retried; a DaemonSet's init container may use 0, so the pod starts and "
                   "its agent sees failed.json and stays idle.")
def install(root: Path, runtime: str, mirror: str, registries: list[Upstream],
            restart_command: str | None, dry_run: bool, no_restart: bool, health_timeout: float,
            containerd_config: str, containerd_socket: Path | None,
            containerd_version: tuple[int, int, int] | None, docker_socket: Path | None,
            proxy: str, no_proxy: list[str], agent_data_dir: str, ca_cert: Path | None,
            agent_user: tuple[int, int] | None, allow_dockerd_restart: bool, force: bool,
            skipped_exit_code: int) -> None:
    """Point the node's container runtime at the local mirror, restart it, check it.

    containerd: sets the CRI registry config_path in config.toml (every other setting and
    comment kept) and writes certs.d/<registry>/hosts.toml with the mirror first and the
    registry itself as fallback. dockerd: adds registry-mirrors to daemon.json, a systemd
    drop-in pointing HTTPS_PROXY at the agent, and the agent's CA in certs.d for each
    --registry; it is restarted only with live-restore on (or --allow-dockerd-restart).
    Originals are kept for `p2p-mirror uninstall`; if the runtime does not come back, they are
    restored. The runtime is restarted only when its config file changed (containerd re-reads
    hosts.toml on every pull).
    """
    opts = engine.Options(
        root=root.absolute(), runtime=runtime, mirror=mirror, registries=registries,
        restart_command=restart_command, restart=not no_restart, health_timeout=health_timeout,
        containerd_config=containerd_config, containerd_socket=containerd_socket,
        docker_socket=docker_socket, proxy=proxy, no_proxy=no_proxy,
        agent_data_dir=agent_data_dir, ca_cert=ca_cert, agent_owner=agent_user,
        allow_dockerd_restart=allow_dockerd_restart, containerd_version=containerd_version,
        force=force,
    )
    _run(engine.dry_run if dry_run else engine.install, opts, skipped_exit_code)


@click.command()
@root_option
@restart_option
@no_restart_option
@health_option
@containerd_socket_option
@docker_socket_option
@allow_dockerd_option
def uninstall(root: Path, restart_command: str | None, no_restart: bool, health_timeout: float,
              containerd_socket: Path | None, docker_socket: Path | None,
              allow_dockerd_restart: bool) -> None:
    """Undo `p2p-mirror install`: restore every changed file byte for byte, remove the files
    and directories it added, restart the runtime."""
    opts = engine.Options(
        root=root.absolute(), restart_command=restart_command, restart=not no_restart,
        health_timeout=health_timeout, containerd_socket=containerd_socket,
        docker_socket=docker_socket, allow_dockerd_restart=allow_dockerd_restart,
    )
    _run(engine.uninstall, opts)
