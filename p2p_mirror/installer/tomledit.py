"""Edit one key of a TOML document with tomlkit, keeping the user's comments and layout.

tomlkit keeps every byte it does not touch; we still prove each edit with tomllib: the result
must parse to the original document plus the one change, or the edit is refused.
"""

from __future__ import annotations

import copy
import re
import sys
from typing import Any

import tomlkit
from tomlkit.container import Container
from tomlkit.exceptions import TOMLKitError
from tomlkit.items import AoT, Item, Table

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 needs the tomli backport
    import tomli as tomllib

Key = tuple[str, ...]
Value = str | bool | list[Any]


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


def format_key(key: Key) -> str:
    """``plugins."io.containerd.grpc.v1.cri".registry``: bare parts where TOML allows them."""
    return ".".join(p if re.fullmatch(r"[A-Za-z0-9_-]+", p) else f'"{p}"' for p in key)


def set_key(text: str, table: Key, key: str, value: Value, what: str) -> str:
    """Return ``text`` with ``table.key = value``, every other byte kept where tomlkit can.

    An existing key keeps its line and comment; a new key goes into its table with the
    indentation of the table's other keys; a missing table is added after its parent's.
    """
    before = parse(text, what)
    if get_path(before, (*table, key)) == value:
        return text
    try:
        new_text = _edit(text, table, key, value)
    except (TOMLKitError, TypeError, ValueError, KeyError) as e:
        raise TomlEditError(
            f"{what}: cannot set {format_key((*table, key))} safely ({e}); set it by hand"
        ) from None
    verify(before, new_text, (*table, key), value, what)
    return new_text


def _edit(text: str, table: Key, key: str, value: Value) -> str:
    doc = tomlkit.parse(text)
    node: Any = doc
    depth = 0
    while depth < len(table) and table[depth] in node:
        node = node[table[depth]]
        depth += 1
        if isinstance(node, AoT) or not isinstance(node, (Table, Container, dict)):
            raise TypeError(f"{format_key(table[:depth])} is not a table")
    if depth < len(table):  # build the missing tables, the key inside, then attach them
        new = tomlkit.table()
        new.add(key, value)
        new.item(key).trivia.indent = _child_indent(node) if isinstance(node, Table) else "  "
        new.add(tomlkit.nl())
        for part in reversed(table[depth + 1 :]):
            outer = tomlkit.table(is_super_table=True)
            outer.append(part, new)
            new = outer
        node.append(table[depth], new)
    else:
        indent = None if key in node or not isinstance(node, Table) else _key_indent(node)
        node[key] = value
        if indent is not None:
            node.item(key).trivia.indent = indent
    out = tomlkit.dumps(doc)
    if out.endswith("\n\n") and not text.endswith("\n\n"):
        out = out[:-1]
    return out


def _key_indent(table: Table) -> str:
    """Indentation of the table's own keys, else its header's plus two spaces."""
    for k, item in table.value.body:
        if k is not None and isinstance(item, Item) and not isinstance(item, (Table, AoT)):
            return item.trivia.indent
    return _child_indent(table)


def _child_indent(table: Table) -> str:
    return (table.trivia.indent or "") + "  "


def verify(before: dict[str, Any], new_text: str, key: Key, value: Any, what: str) -> None:
    """The edit must parse, carry the value, and change nothing else in the document."""
    try:
        after = tomllib.loads(new_text)
    except tomllib.TOMLDecodeError as e:
        raise TomlEditError(
            f"{what}: cannot set {format_key(key)} safely (the edit would not parse: {e}); "
            "set it by hand"
        ) from None
    expected = copy.deepcopy(before)
    node = expected
    for part in key[:-1]:
        node = node.setdefault(part, {})
    node[key[-1]] = value
    if after != expected:
        raise TomlEditError(
            f"{what}: setting {format_key(key)} would change other settings; set it by hand"
        )
