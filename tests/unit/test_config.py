"""Config parsing: every bad value is refused with the key that holds it; flags beat the file."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from p2p_mirror.cli import main
from p2p_mirror.core.config import (
    DOCKER_HUB_ENDPOINT,
    AgentConfig,
    ConfigError,
    GiB,
    HostPort,
    MiB,
    SeederConfig,
    TrackerConfig,
    Upstream,
    load_config,
    parse_fraction,
    parse_registries,
    parse_registry_flag,
    parse_seconds,
    parse_size,
)

# --- HostPort ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:5004", "127.0.0.1", 5004),
        ("0.0.0.0:0", "0.0.0.0", 0),
        ("localhost:65535", "localhost", 65535),
        (" 10.1.2.3:80 ", "10.1.2.3", 80),
        ("[::1]:6881", "::1", 6881),
        ("[fe80::1:2]:443", "fe80::1:2", 443),
    ],
)
def test_hostport_parse_ok(text: str, host: str, port: int) -> None:
    hp = HostPort.parse(text)
    assert (hp.host, hp.port) == (host, port)


def test_hostport_str_round_trips_ipv6_with_brackets() -> None:
    assert str(HostPort.parse("[::1]:80")) == "[::1]:80"
    assert str(HostPort.parse("1.2.3.4:80")) == "1.2.3.4:80"
    assert HostPort.parse(str(HostPort.parse("[2001:db8::5]:9"))) == HostPort("2001:db8::5", 9)


@pytest.mark.parametrize(
    "text",
    [
        "nonsense",
        "127.0.0.1",
        ":80",
        "host:",
        "host:port",
        "host:70000",
        "::1:80",  # IPv6 without brackets is ambiguous
        "[::1]",
        "[not-ipv6]:80",
        "[1.2.3.4]:80",  # brackets are for IPv6 only
        "",
        "a:1:2",
    ],
)
def test_hostport_parse_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        HostPort.parse(text)


# --- sizes, seconds, fractions -----------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, 0),
        (1048576, MiB),
        ("1048576", MiB),
        ("64MiB", 64 * MiB),
        ("64 mib", 64 * MiB),
        ("1KiB", 1024),
        ("2Gi", 2 * GiB),
        ("1.5GiB", 3 * GiB // 2),
        ("10GB", 10 * 1000**3),
        ("10G", 10 * 1000**3),
        ("50MB/s", 50 * 1000**2),
        ("512kb", 512_000),
        ("7B", 7),
        ("1TiB", 1024**4),
    ],
)
def test_parse_size_ok(value: object, expected: int) -> None:
    assert parse_size(value) == expected


@pytest.mark.parametrize(
    "value",
    [-1, "-1", "-5MiB", "garbage", "", "MiB", "10XB", "10 MiB MiB", "5i", "1e3", True, None,
     "nan", "inf", [], "10MiB/h"],
)
def test_parse_size_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        parse_size(value)


@pytest.mark.parametrize(("value", "expected"), [(30, 30.0), ("2.5", 2.5), ("15s", 15.0)])
def test_parse_seconds_ok(value: object, expected: float) -> None:
    assert parse_seconds(value) == expected


@pytest.mark.parametrize("value", [0, -1, "0s", "soon", True, "nan", "inf", float("nan")])
def test_parse_seconds_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        parse_seconds(value)


@pytest.mark.parametrize(("value", "expected"), [("5%", 0.05), (0.1, 0.1), ("0", 0.0)])
def test_parse_fraction(value: object, expected: float) -> None:
    assert parse_fraction(value) == pytest.approx(expected)


@pytest.mark.parametrize("value", ["100%", 1, 1.5, "-1%", "half"])
def test_parse_fraction_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        parse_fraction(value)


# --- registries --------------------------------------------------------------------------


def test_registry_flag_name_equals_url() -> None:
    up = parse_registry_flag("registry.example.test=http://127.0.0.1:5000/")
    assert up == Upstream("registry.example.test", "http://127.0.0.1:5000")


def test_registry_flag_name_alone_means_https_name() -> None:
    assert parse_registry_flag("ghcr.io") == Upstream("ghcr.io", "https://ghcr.io")
    assert parse_registry_flag("localhost:5000").url == "https://localhost:5000"


def test_registry_flag_docker_hub_uses_its_real_endpoint() -> None:
    assert parse_registry_flag("docker.io").url == DOCKER_HUB_ENDPOINT == (
        "https://registry-1.docker.io"
    )


@pytest.mark.parametrize(
    "text",
    ["", "bad/name=http://x", "-bad.io", "bad_.io", "a..b", "UPPER CASE", "x.io:port",
     "x.io=", "x.io=ftp://x", "x.io=http://", "x.io=http://h/p?q=1", "x.io=http://h/#frag",
     "x.io=not a url", "x.io:0", "x.io:65536", "x.io:99999999999"],
)
def test_registry_flag_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_registry_flag(text)


def test_parse_registries_mapping_list_and_nested() -> None:
    got = parse_registries(
        {
            "a.test": "http://127.0.0.1:1/",
            "b.test": {"url": "https://10.0.0.1:5000", "verify_tls": False},
            "c.test": {"verify_tls": "yes"},
            "docker.io": {"verify_tls": True},
        }
    )
    assert got["a.test"] == Upstream("a.test", "http://127.0.0.1:1")
    assert got["b.test"] == Upstream("b.test", "https://10.0.0.1:5000", False)
    assert got["c.test"] == Upstream("c.test", "https://c.test", True)
    # Without a url, Docker Hub must still go to its API host, not https://docker.io.
    assert got["docker.io"].url == DOCKER_HUB_ENDPOINT
    assert parse_registries(["x.test=http://127.0.0.1:2", "docker.io"]) == {
        "x.test": Upstream("x.test", "http://127.0.0.1:2"),
        "docker.io": Upstream("docker.io", DOCKER_HUB_ENDPOINT),
    }
    assert parse_registries(None) == {}


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ({"a.test": {"url": "http://h", "skip_verify": True}}, ["a.test", "skip_verify"]),
        ({"a.test": 5}, ["a.test"]),
        ({"a.test": {"verify_tls": "maybe"}}, ["maybe"]),
        ({"bad/name": "http://h"}, ["bad/name"]),
        ("a.test=http://h", ["mapping"]),
    ],
)
def test_parse_registries_rejects(value: object, words: list[str]) -> None:
    with pytest.raises(ValueError) as exc:
        parse_registries(value)
    for word in words:
        assert word in str(exc.value)


# --- load_config -------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_load_yaml_then_flags_win_and_registries_merge(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
data_dir: {tmp_path / "data"}
listen: 127.0.0.1:5100
cache-max-bytes: 10GiB
download_rate_limit: 50MB/s
min_free_disk: 10%
seeder: http://127.0.0.1:5005
registries:
  a.test: http://127.0.0.1:5001
  b.test: {{url: "http://127.0.0.1:5002", verify_tls: false}}
""",
    )
    cfg = load_config(
        AgentConfig,
        path,
        {
            "listen": "127.0.0.1:5200",
            "registries": ("b.test=http://127.0.0.1:6002", "c.test=http://127.0.0.1:6003"),
            "log_level": None,  # an unset flag keeps the file's (or default) value
            "seeder": (),
        },
    )
    assert isinstance(cfg, AgentConfig)
    assert cfg.data_dir == tmp_path / "data"
    assert cfg.listen == HostPort("127.0.0.1", 5200)
    assert cfg.cache_max_bytes == 10 * GiB
    assert cfg.download_rate_limit == 50_000_000
    assert cfg.min_free_disk == pytest.approx(0.10)
    assert cfg.seeder == ["http://127.0.0.1:5005"]
    assert cfg.log_level == "INFO"
    assert cfg.registries == {
        "a.test": Upstream("a.test", "http://127.0.0.1:5001"),
        "b.test": Upstream("b.test", "http://127.0.0.1:6002"),
        "c.test": Upstream("c.test", "http://127.0.0.1:6003"),
    }
    assert cfg.upstream("a.test").url == "http://127.0.0.1:5001"
    assert cfg.upstream("other.test") is None  # an allowlist: no https://NAME default


def test_load_flags_only_and_defaults(tmp_path: Path) -> None:
    cfg = load_config(AgentConfig, None, {"data_dir": str(tmp_path)})
    assert cfg.listen == HostPort("127.0.0.1", 5004)
    assert cfg.default_registry == "docker.io"
    assert cfg.cache_max_bytes == 20 * GiB
    assert cfg.seeder == []
    tracker = load_config(TrackerConfig, None, {})
    assert tracker.listen == HostPort("0.0.0.0", 6969)


def test_unknown_key_is_named(tmp_path: Path) -> None:
    path = write(tmp_path, f"data_dir: {tmp_path}\ncache_max_byte: 1GiB\n")
    with pytest.raises(ConfigError) as exc:
        load_config(AgentConfig, path)
    assert "cache_max_byte" in str(exc.value)
    assert "unknown" in str(exc.value)


def test_required_key_missing_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"agent config: data_dir is required"):
        load_config(AgentConfig, write(tmp_path, "listen: 127.0.0.1:1\n"))
    with pytest.raises(ConfigError, match=r"seeder config: tracker is required"):
        load_config(SeederConfig, None, {"data_dir": str(tmp_path)})


def test_invalid_yaml(tmp_path: Path) -> None:
    path = write(tmp_path, "data_dir: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(AgentConfig, path)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_non_mapping_yaml(tmp_path: Path, text: str) -> None:
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(AgentConfig, write(tmp_path, text))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(AgentConfig, tmp_path / "absent.yaml")


def test_empty_yaml_is_an_empty_mapping(tmp_path: Path) -> None:
    cfg = load_config(AgentConfig, write(tmp_path, ""), {"data_dir": str(tmp_path)})
    assert cfg.data_dir == tmp_path


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("cache_max_bytes", "lots"),
        ("listen", "nonsense"),
        ("bt_listen", "1.2.3.4:99999"),
        ("seeder", "ftp://x"),
        ("default_registry", "not/a/registry"),
        ("min_free_disk", "150%"),
        ("swarm_timeout", "-3"),
        ("swarm_peers", "0"),
        ("swarm_peers", "2.5"),
        ("log_level", "chatty"),
        ("registries", "[bad/name]"),
        ("registries", "{a.test: {url: http://h, skip_verify: true}}"),
    ],
)
def test_bad_value_error_names_the_key(tmp_path: Path, key: str, value: str) -> None:
    path = write(tmp_path, f"data_dir: {tmp_path}\n{key}: {value}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(AgentConfig, path)
    assert str(exc.value).startswith(f"agent config: {key}: "), str(exc.value)


def test_bad_flag_value_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^agent config: upload_rate_limit: "):
        load_config(AgentConfig, None, {"data_dir": str(tmp_path), "upload_rate_limit": "fast"})


# --- CLI ---------------------------------------------------------------------------------


def test_cli_bad_listen_exits_nonzero_naming_the_key(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        main, ["agent", "--listen", "nonsense", "--data-dir", str(tmp_path / "data")]
    )
    assert result.exit_code != 0
    assert "listen" in result.output
    assert "nonsense" in result.output
    assert not (tmp_path / "data").exists()  # refused before doing anything


def test_cli_unknown_config_key_exits_nonzero(tmp_path: Path) -> None:
    path = write(tmp_path, f"data_dir: {tmp_path}\nbogus_key: 1\n")
    result = CliRunner().invoke(main, ["agent", "--config", str(path)])
    assert result.exit_code != 0
    assert "bogus_key" in result.output


def test_cli_agent_help_mentions_flags() -> None:
    result = CliRunner().invoke(main, ["agent", "--help"])
    assert result.exit_code == 0
    for flag in ("--config", "--listen", "--data-dir", "--seeder", "--registry",
                 "--cache-max-bytes", "--download-rate-limit", "--upload-rate-limit",
                 "--default-registry", "--bt-listen", "--log-level"):
        assert flag in result.output, flag


def test_list_and_dict_defaults_are_fresh_empty_containers(tmp_path: Path) -> None:
    """An unset seeder must be an empty list (falsy: origin only), not the ``list`` type."""
    a = load_config(AgentConfig, None, {"data_dir": str(tmp_path)})
    b = AgentConfig(data_dir=tmp_path)
    assert a.seeder == [] and a.registries == {}
    assert not b.seeder and b.registries == {}
    assert a.seeder is not b.seeder
    assert a.upstream("docker.io") is None
    hub = load_config(AgentConfig, None, {"data_dir": str(tmp_path), "registries": ["docker.io"]})
    assert hub.upstream("docker.io").url == DOCKER_HUB_ENDPOINT


def test_seeder_trackers_take_udp_and_http_urls_and_name_the_key_otherwise(
        tmp_path: Path) -> None:  # fmt: skip
    cfg = load_config(SeederConfig, None, {"data_dir": str(tmp_path), "tracker": [
        "udp://t0.example:6969/announce", "http://t1.example:6969/announce/",
        "udp://[fd00::1]:6969"]})  # fmt: skip
    assert cfg.tracker == ["udp://t0.example:6969/announce", "http://t1.example:6969/announce",
                           "udp://[fd00::1]:6969"]  # fmt: skip
    for bad in ("udp://t0.example/announce", "udp://t:6969/announce?token=x", "ftp://t/x"):
        with pytest.raises(ConfigError, match=r"seeder config: tracker: .*tracker URL|udp://"):
            load_config(SeederConfig, None, {"data_dir": str(tmp_path), "tracker": [bad]})
