"""Loading a config: a YAML file and `--set dotted.key=value` overrides, validated as one
`TameConfig` (the schema, `cluster.shared.config`), every error naming the key, the file and
the line."""

from __future__ import annotations

import json
import re
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from cluster.shared.config import TameConfig
from cluster.shared.errors import ConfigError


def read_yaml(path: str | Path) -> tuple[dict, dict[tuple, int]]:
    """The mapping in a YAML file, and the 1-based line of each key path in it. A file that is
    missing, not UTF-8, not YAML, not a mapping, or gives a key twice is a ConfigError naming
    the file and line."""
    where = str(path)
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{where}: config file not found")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(
            f"{where}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}): save the config as UTF-8"
        ) from None
    data: Any = {}
    lines: dict[tuple, int] = {}
    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            lines = _key_lines(node)  # before constructing, which flattens `<<` merges into the node
            data = loader.construct_document(node) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{where}{at}: invalid YAML: {getattr(e, 'problem', e)}") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise ConfigError(f"{where}:1: the config must be a mapping of sections")
    return data, lines


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping: PyYAML keeps the last one
    silently, so a second `ppo:` section would throw the first away. Keys are compared as
    constructed, so `1` and `1.0`, or `yes` and `true`, are the same key, as in the dict."""

    def __init__(self, stream):
        super().__init__(stream)
        self._paths: dict[yaml.Node, tuple] = {}  # key path of each node, for the message

    def construct_mapping(self, node, deep=False):
        path = self._paths.get(node, ())
        first_lines: dict[Any, int] = {}
        for key_node, value_node in node.value if isinstance(node, yaml.MappingNode) else ():
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` brings keys in to be overridden: that is what it is for
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                break  # SafeLoader's own error names it
            spelled = key_node.value if isinstance(key_node, yaml.ScalarNode) else key
            if key in first_lines:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"{'.'.join(map(str, path + (spelled,)))}: duplicate key, first on line "
                    f"{first_lines[key]} (YAML would keep only the last)",
                    key_node.start_mark,
                )
            first_lines[key] = key_node.start_mark.line + 1
            self._paths.setdefault(value_node, path + (spelled,))
        return super().construct_mapping(node, deep=deep)

    def construct_sequence(self, node, deep=False):
        if isinstance(node, yaml.SequenceNode):
            path = self._paths.get(node, ())
            for i, child in enumerate(node.value):
                self._paths.setdefault(child, path + (i,))
        return super().construct_sequence(node, deep=deep)


def _key_lines(node: yaml.Node, prefix: tuple = ()) -> dict[tuple, int]:
    """Map every key path of a YAML document to the 1-based line where it appears."""
    lines: dict[tuple, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = prefix + (key.value,)
            lines[path] = key.start_mark.line + 1
            lines.update(_key_lines(value, path))
    elif isinstance(node, yaml.SequenceNode):
        for i, value in enumerate(node.value):
            path = prefix + (i,)
            lines[path] = value.start_mark.line + 1
            lines.update(_key_lines(value, path))
    return lines


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], value parsed as YAML)."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: value is not valid YAML: {e}") from None
    return key.strip().split("."), value


def apply_override(data: dict, path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(path)}: {part!r} is not a section")
        node = child
    node[path[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] = (), command: str = "train") -> TameConfig:
    """Read a YAML config, apply `dotted.key=value` overrides and validate the whole tree,
    with the checks across sections that `command` ("train", "sft", "train-rm",
    "serve-reward") needs: an SFT config needs no reward model.

    Raises ConfigError naming the key path, the file and the line for every problem.
    """
    data, lines, where = ({}, {}, "<defaults>") if path is None else (*read_yaml(path), str(path))
    overridden: set[tuple] = set()
    for item in overrides:
        keys, value = parse_override(item)
        apply_override(data, keys, value)
        overridden.add(tuple(keys))

    try:
        return TameConfig.model_validate(data, context={"command": command})
    except ValidationError as e:
        raise ConfigError(_describe(e, where, lines, overridden)) from None


def _describe(err: ValidationError, where: str, lines: dict, overridden: set) -> str:
    def origin(loc: tuple) -> str | None:
        if any(loc[: len(o)] == o or o[: len(loc)] == loc for o in overridden):
            return f"--set {'.'.join(map(str, loc))}"
        # The nearest enclosing key that the file spells out gives the line.
        line = next((lines[loc[:i]] for i in range(len(loc), 0, -1) if loc[:i] in lines), None)
        return f"{where}:{line}" if line else None

    out = []
    for problem in err.errors():
        loc = tuple(problem["loc"])
        key = ".".join(str(p) for p in loc) or "<root>"
        msg = problem["msg"].removeprefix("Value error, ")
        if problem["type"] == "extra_forbidden":
            msg = "unknown key"
        elif problem["type"] == "value_error" and len(loc) <= 1:
            # A check across fields names them in full: point at the first the user gave.
            named = [tuple(m.split(".")) for m in re.findall(r"\b[a-z_]+(?:\.[a-z_]+)+\b", msg)]
            given = [origin(n) for n in named if origin(n)]
            out.append(f"{given[0] if given else where}: {msg}")
            continue
        elif "input" in problem and problem["type"] != "missing":
            msg += f" (got {json.dumps(problem['input'], default=str)[:80]})"
        out.append(f"{origin(loc) or where}: {key}: {msg}")
    return "invalid config:\n  " + "\n  ".join(out)
