"""Surgical edits of TOML text: set one key in one table, keep every other byte.

Python has a TOML parser (tomllib) but no writer, and a writer would drop the user's comments
and layout anyway. So we edit the text line by line and then prove the edit with tomllib:
the result must parse, hold the new value, and be otherwise equal to the original document.
"""

from __future__ import annotations

import copy
import re
import sys
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 needs the tomli backport
    import tomli as tomllib

Key = tuple[str, ...]


class TomlEditError(ValueError):
    """The text cannot be edited safely (it does not parse, or the edit would change more)."""


def parse(text: str, what: str) -> dict[str, Any]:
    """Parse TOML or raise ``TomlEditError`` naming the file and the parser's message."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise TomlEditError(f"{what}: not valid TOML: {e}") from None


def get_path(doc: dict[str, Any], key: Key) -> Any:
    """The value at a dotted key path, or None if any part is missing."""
    node: Any = doc
    for part in key:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def literal(value: str | bool) -> str:
    """A TOML literal for a string or a boolean."""
    if isinstance(value, bool):
        return "true" if value else "false"
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def format_key(key: Key) -> str:
    """``plugins."io.containerd.grpc.v1.cri".registry``: bare parts where TOML allows them."""
    return ".".join(p if re.fullmatch(r"[A-Za-z0-9_-]+", p) else literal(p) for p in key)


_BARE = re.compile(r"[A-Za-z0-9_-]+")


def parse_key(text: str) -> Key | None:
    """Split a dotted TOML key (bare, "basic" or 'literal' parts); None if it is not one."""
    parts: list[str] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in " \t":
            i += 1
        if i >= n:
            return None
        if text[i] == '"':
            m = re.compile(r'"((?:[^"\\]|\\.)*)"').match(text, i)
            if not m:
                return None
            try:
                parts.append(tomllib.loads(f"k = {m.group(0)}")["k"])
            except tomllib.TOMLDecodeError:
                return None
            i = m.end()
        elif text[i] == "'":
            end = text.find("'", i + 1)
            if end < 0:
                return None
            parts.append(text[i + 1 : end])
            i = end + 1
        else:
            m = _BARE.match(text, i)
            if not m:
                return None
            parts.append(m.group(0))
            i = m.end()
        while i < n and text[i] in " \t":
            i += 1
        if i == n:
            return tuple(parts)
        if text[i] != ".":
            return None
        i += 1


_HEADER = re.compile(r"^\s*\[(?!\[)(.*?)\]\s*(?:#.*)?$")
_ARRAY_HEADER = re.compile(r"^\s*\[\[.*\]\]\s*(?:#.*)?$")


def _header_lines(lines: list[str]) -> list[tuple[int, Key | None]]:
    """Line index and key of each table header, skipping multi-line strings."""
    out: list[tuple[int, Key | None]] = []
    in_multiline: str | None = None
    for idx, line in enumerate(lines):
        if in_multiline:
            if line.count(in_multiline) % 2 == 1:
                in_multiline = None
            continue
        for quote in ('"""', "'''"):
            if line.count(quote) % 2 == 1:
                in_multiline = quote
        if in_multiline:
            continue
        if _ARRAY_HEADER.match(line):
            out.append((idx, None))
            continue
        m = _HEADER.match(line)
        if m:
            out.append((idx, parse_key(m.group(1))))
    return out


def _key_line(key: str) -> re.Pattern[str]:
    quoted = f"(?:{re.escape(key)}|\"{re.escape(key)}\"|'{re.escape(key)}')"
    return re.compile(rf"^(\s*{quoted}\s*=\s*)(\"(?:[^\"\\]|\\.)*\"|'[^']*'|true|false)(.*)$")


def set_key(text: str, table: Key, key: str, value: str | bool, what: str) -> str:
    """Return ``text`` with ``table.key = value``; all else byte-identical where possible.

    Replaces the value on an existing ``key = ...`` line of the table, or inserts a line after
    the table's header, or appends a new table at the end. The result is checked with tomllib.
    """
    before = parse(text, what)
    if get_path(before, (*table, key)) == value:
        return text
    keepends = text.splitlines(keepends=True)
    lines = [line.rstrip("\r\n") for line in keepends]
    headers = _header_lines(lines)
    new_text: str | None = None
    for pos, (idx, hkey) in enumerate(headers):
        if hkey != table:
            continue
        end = headers[pos + 1][0] if pos + 1 < len(headers) else len(lines)
        pattern = _key_line(key)
        for j in range(idx + 1, end):
            m = pattern.match(lines[j])
            if m:
                eol = keepends[j][len(lines[j]) :]
                keepends[j] = f"{m.group(1)}{literal(value)}{m.group(3)}{eol}"
                new_text = "".join(keepends)
                break
        else:
            indent = _indent_after(lines, idx, end)
            eol = _eol(keepends[idx])
            keepends.insert(idx + 1, f"{indent}{key} = {literal(value)}{eol}")
            new_text = "".join(keepends)
        break
    if new_text is None:
        sep = "" if not text or text.endswith("\n") else "\n"
        blank = "\n" if text.strip() else ""
        new_text = f"{text}{sep}{blank}[{format_key(table)}]\n  {key} = {literal(value)}\n"
    _verify(before, new_text, table, key, value, what)
    return new_text


def _indent_after(lines: list[str], header: int, end: int) -> str:
    """Indentation of the table's first key line (or the header's plus two spaces)."""
    for j in range(header + 1, end):
        stripped = lines[j].lstrip()
        if stripped and not stripped.startswith("#"):
            return lines[j][: len(lines[j]) - len(stripped)]
    h = lines[header]
    return h[: len(h) - len(h.lstrip())] + "  "


def _eol(line: str) -> str:
    return "\r\n" if line.endswith("\r\n") else "\n"


def _verify(before: dict[str, Any], new_text: str, table: Key, key: str, value: Any, what: str):
    """The edit must parse, carry the value, and change nothing else in the document."""
    try:
        after = tomllib.loads(new_text)
    except tomllib.TOMLDecodeError as e:
        raise TomlEditError(
            f"{what}: cannot add {format_key((*table, key))} safely (the edit would not parse: "
            f"{e}); set it by hand"
        ) from None
    if get_path(after, (*table, key)) != value:
        raise TomlEditError(
            f"{what}: cannot set {format_key((*table, key))} safely; set it by hand"
        )
    expected = copy.deepcopy(before)
    node = expected
    for part in table:
        node = node.setdefault(part, {})
    node[key] = value
    if after != expected:
        raise TomlEditError(
            f"{what}: setting {format_key((*table, key))} would change other settings; "
            "set it by hand"
        )
