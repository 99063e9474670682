"""The docs: a short front page, configuration docs that match the code, links that resolve."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml
from support import REPO

from p2p_mirror.core import config_docs
from p2p_mirror.core.config_docs import NOTES, REGENERATE, ROLES, render

README = REPO / "README.md"
DOCS = REPO / "docs"
MARKDOWN = [
    README,
    REPO / "bench" / "README.md",
    REPO / "ansible" / "README.md",
    REPO / "deploy" / "daemonset" / "README.md",
    *sorted(DOCS.glob("*.md")),
]


def test_readme_is_a_front_page_of_at_most_8_kib() -> None:
    size = len(README.read_bytes())
    assert size <= 8 * 1024, f"README.md is {size} bytes; move detail to docs/"


def test_readme_gives_the_quick_start_and_test_commands() -> None:
    text = README.read_text()
    assert "bash scripts/test.sh" in text  # .ci/run runs the test command the README gives
    assert "bash scripts/demo.sh" in text


def test_configuration_docs_match_the_code() -> None:
    written = (DOCS / "configuration.md").read_text()
    assert written == render(), f"docs/configuration.md is stale; regenerate: {REGENERATE}"


def test_every_key_is_documented_with_a_doc_string() -> None:
    for role, cls in ROLES:
        for f in dataclasses.fields(cls):
            assert f.metadata.get("doc"), f"{role} config key {f.name} has no doc"
            assert f"| `{f.name}` |" in config_docs.role_section(role, cls)


def test_notes_name_existing_keys() -> None:
    roles = dict(ROLES)
    assert set(NOTES) <= set(roles)
    for role, notes in NOTES.items():
        keys = {f.name for f in dataclasses.fields(roles[role])}
        stale = set(notes) - keys
        assert not stale, f"config_docs.NOTES[{role!r}] names keys {role} no longer has: {stale}"


def _field_defaults() -> list[tuple[str, dataclasses.Field]]:
    return [
        (role, f)
        for role, cls in ROLES
        for f in dataclasses.fields(cls)
        if not f.metadata.get("required")
    ]


@pytest.mark.parametrize(
    ("role", "f"), _field_defaults(), ids=lambda v: v if isinstance(v, str) else v.name
)
def test_rendered_default_reads_back_as_the_default(role: str, f: dataclasses.Field) -> None:
    """A default as the docs print it, put in a YAML file, is the default itself."""
    value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    if value is None:
        assert config_docs.default_of(f) == "`none`"
        return
    shown = config_docs.default_of(f).strip("`")
    assert f.metadata["parse"](yaml.safe_load(shown)) == value, f"{role}.{f.name}: {shown}"


@pytest.mark.parametrize(
    ("value", "shown"),
    [(16 * 1024**2, "16MiB"), (20 * 1024**3, "20GiB"), (128 * 1024, "128KiB"),
     (0, "0"), (1000, "1000"), (3 * 1024**2 + 1, str(3 * 1024**2 + 1))],
)  # fmt: skip
def test_sizes_read_as_binary_units_only_when_whole(value: int, shown: str) -> None:
    assert config_docs.format_size(value) == shown


def test_write_flag_writes_what_render_returns(tmp_path: Path) -> None:
    out = tmp_path / "configuration.md"
    assert config_docs.main(["--write", str(out)]) == 0
    assert out.read_text() == render()


LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("doc", MARKDOWN, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(doc: Path) -> None:
    missing = [
        target
        for target in LINK.findall(doc.read_text())
        if "://" not in target and not (doc.parent / target).exists()
    ]
    assert not missing, f"{doc.relative_to(REPO)} links to missing files: {missing}"


# Top-level folders and commands from before the code moved into p2p_mirror/ and lab/.
OLD_NAMES = re.compile(
    r"(?<![\w./-])(?:mirror|tracker|installer)/"
    r"|python -m mirror\b|python3? bench/(?:distribute|stream)\.py"
)


@pytest.mark.parametrize("doc", MARKDOWN, ids=lambda p: str(p.relative_to(REPO)))
def test_no_paths_from_before_the_restructure(doc: Path) -> None:
    found = OLD_NAMES.findall(doc.read_text())
    assert not found, f"{doc.relative_to(REPO)} names old paths: {found}"


def _module_map() -> set[str]:
    text = (DOCS / "design.md").read_text()
    section = text.split("## Module map", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"`((?:p2p_mirror|lab)/[\w/]+\.py)`", section))


def test_module_map_names_every_module_and_no_other() -> None:
    on_disk = {
        str(p.relative_to(REPO))
        for top in ("p2p_mirror", "lab")
        for p in (REPO / top).rglob("*.py")
    }
    listed = _module_map()
    missing = sorted(p for p in on_disk - listed if not p.endswith("__init__.py"))
    assert not missing, f"docs/design.md's module map lacks: {missing}"
    gone = sorted(listed - on_disk)
    assert not gone, f"docs/design.md's module map names modules that are gone: {gone}"
