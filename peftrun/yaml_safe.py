"""YAML with limits: every YAML file peftrun reads (recipes, the recipe copy saved in an adapter folder,
override values) goes through here, so a hostile or broken file costs one error line, never memory,
a RecursionError or a traceback.

Refused, each with a PeftrunError naming the file (and line where there is one):
  - a file larger than MAX_YAML_BYTES, a binary file (NUL bytes), text that is not UTF-8;
  - nesting deeper than MAX_DEPTH levels, counted after aliases are followed;
  - more than MAX_NODES values once every alias is expanded (the "billion laughs" alias bomb);
  - an anchor that contains an alias to itself (a self-referential document);
  - syntax errors, unknown tags (only YAML's safe types are built) and scalars that cannot be built
    (a date that does not exist, an integer of thousands of digits);
  - with `mapping=True`, a document whose top level is not a mapping (or that is empty).

Public: `read_yaml(path)` for a file, `parse_yaml(text, source=...)` for text, and `parse_yaml_lines`,
which also returns the line of every key path for messages that say where.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from peftrun.errors import PeftrunError, one_line

MAX_YAML_BYTES = 1 << 20  # 1 MiB: a recipe is a few KB
MAX_DEPTH = 64  # nested mappings and lists, after following aliases
MAX_NODES = 100_000  # values after expanding every alias

Lines = dict[tuple[str, ...], int]


class YamlSyntaxError(PeftrunError):
    """Text that is not YAML at all (as opposed to YAML over a limit): `--set` then takes it as a string."""


class _OverLimit(Exception):
    def __init__(self, message: str, mark: Any = None):
        super().__init__(message)
        self.message = message
        self.mark = mark


class _LimitedLoader(yaml.SafeLoader):
    """PyYAML's safe loader whose composer refuses nesting beyond MAX_DEPTH before it recurses."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):  # noqa: D401 - PyYAML's hook
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _OverLimit(f"nested deeper than {MAX_DEPTH} levels", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _measure(root: yaml.Node) -> None:
    """Refuse a node graph that loops, or that is too large or too deep once aliases are expanded.

    Iterative and memoised on node identity, so an alias bomb is measured in time linear in the file,
    without expanding it.
    """
    done: dict[int, tuple[int, int]] = {}  # id(node) -> (values when expanded, depth when expanded)
    open_: set[int] = set()  # the nodes on the current path: meeting one again is a cycle
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        if finished:
            kids = _children(node)
            size = 1 + sum(done[id(k)][0] for k in kids)
            depth = 1 + max((done[id(k)][1] for k in kids), default=0)
            open_.discard(key)
            if size > MAX_NODES:
                raise _OverLimit(
                    f"expands to more than {MAX_NODES:,} values (aliases repeating aliases: an alias bomb?)",
                    node.start_mark,
                )
            if depth > MAX_DEPTH:
                raise _OverLimit(f"nested deeper than {MAX_DEPTH} levels once aliases are followed", node.start_mark)
            done[key] = (size, depth)
            continue
        if key in done:
            continue
        open_.add(key)
        stack.append((node, True))
        for kid in _children(node):
            if id(kid) in open_:
                raise _OverLimit("an anchor refers to itself (a self-referential alias)", node.start_mark)
            if id(kid) not in done:
                stack.append((kid, False))


def _where(source: str, mark: Any) -> str:
    return f"{source}:{mark.line + 1}" if mark is not None else source


def _syntax_error(exc: yaml.YAMLError, source: str) -> YamlSyntaxError:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    if context:  # "expected a single document in the stream", "while parsing a flow sequence"
        problem = f"{context}, {problem}"
    if isinstance(exc, yaml.reader.ReaderError):
        problem = f"unacceptable character #x{exc.character:04x} at position {exc.position}" if isinstance(
            exc.character, int) else str(exc.reason)
    return YamlSyntaxError(f"not valid YAML: {one_line(problem)}", where=_where(source, mark))


def _compose(text: str, source: str) -> tuple[_LimitedLoader, yaml.Node | None]:
    try:
        loader = _LimitedLoader(text)  # the reader refuses control characters here already
    except yaml.YAMLError as exc:
        raise _syntax_error(exc, source) from None
    try:
        root = loader.get_single_node()
        if root is not None:
            _measure(root)
        return loader, root
    except _OverLimit as exc:
        loader.dispose()
        raise PeftrunError(f"YAML refused: {exc.message}", where=_where(source, exc.mark)) from None
    except yaml.YAMLError as exc:
        loader.dispose()
        raise _syntax_error(exc, source) from None
    except RecursionError:  # not reached with MAX_DEPTH well under Python's limit; kept as a last guard
        loader.dispose()
        raise PeftrunError(f"YAML refused: nested deeper than {MAX_DEPTH} levels", where=source) from None


def _construct(loader: _LimitedLoader, root: yaml.Node, source: str) -> Any:
    try:
        return loader.construct_document(root)
    except yaml.YAMLError as exc:
        raise _syntax_error(exc, source) from None
    except Exception as exc:  # noqa: BLE001 - PyYAML's constructors on hostile input fail in many ways
        # a scalar that cannot be built as its type: 2024-13-45, an int of 5,000 digits, `!!timestamp x`
        why = one_line(exc) if isinstance(exc, (ValueError, OverflowError)) else "it does not fit its type or tag"
        raise YamlSyntaxError(f"not valid YAML: a value cannot be read ({why})", where=source) from None
    finally:
        loader.dispose()


def _check_top(data: Any, source: str, what: str) -> None:
    if data is None:
        raise PeftrunError(f"the {what} is empty: a YAML mapping of keys to values was expected", where=source)
    if not isinstance(data, dict):
        raise PeftrunError(f"a {what} is a YAML mapping of keys to values, got {type(data).__name__}", where=source)


def key_lines(root: yaml.Node | None) -> Lines:
    """Every key path of a composed (and measured) document -> its 1-based line."""
    lines: Lines = {}
    stack: list[tuple[yaml.Node, tuple[str, ...]]] = [(root, ())] if root is not None else []
    while stack:  # in document order, so that a key given twice has its last line, as its value is the last
        node, path = stack.pop()
        children: list[tuple[yaml.Node, tuple[str, ...]]] = []
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                sub = (*path, str(key.value))
                lines[sub] = key.start_mark.line + 1
                children.append((value, sub))
        elif isinstance(node, yaml.SequenceNode):
            for i, value in enumerate(node.value):
                sub = (*path, str(i))
                lines[sub] = value.start_mark.line + 1
                children.append((value, sub))
        stack.extend(reversed(children))
    return lines


def parse_yaml_lines(
    text: str, *, source: str, mapping: bool = True, what: str = "YAML file"
) -> tuple[Any, Lines]:
    """Parse `text` within the limits; return the data and the line of every key path."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_YAML_BYTES:
        raise PeftrunError(f"YAML refused: larger than {MAX_YAML_BYTES:,} bytes", where=source)
    if "\x00" in text:
        raise PeftrunError(f"the {what} holds NUL bytes: a binary file, not YAML text", where=source)
    loader, root = _compose(text, source)
    if root is None:  # empty, or only comments
        loader.dispose()
        data = None
    else:
        data = _construct(loader, root, source)  # disposes of the loader
    if mapping:
        _check_top(data, source, what)
    return data, key_lines(root)


def parse_yaml(text: str, *, source: str, mapping: bool = False, what: str = "YAML file") -> Any:
    """Parse `text` within the limits (`source` names it in messages)."""
    return parse_yaml_lines(text, source=source, mapping=mapping, what=what)[0]


def read_yaml_text(path: str | os.PathLike[str], *, what: str = "YAML file") -> str:
    """The text of a YAML file: refused when missing, over MAX_YAML_BYTES, binary or not UTF-8."""
    source = str(path)
    file = Path(path)
    if not file.is_file():
        raise PeftrunError(f"{what} not found" if not file.exists() else f"the {what} is not a file", where=source)
    size = file.stat().st_size
    if size > MAX_YAML_BYTES:
        raise PeftrunError(
            f"YAML refused: the file has {size:,} bytes, over the limit of {MAX_YAML_BYTES:,}", where=source
        )
    with open(file, "rb") as fh:
        raw = fh.read(MAX_YAML_BYTES + 1)
    if len(raw) > MAX_YAML_BYTES:  # grew while we looked
        raise PeftrunError(f"YAML refused: the file is over the limit of {MAX_YAML_BYTES:,} bytes", where=source)
    if b"\x00" in raw:
        raise PeftrunError(f"the {what} holds NUL bytes: a binary file, not YAML text", where=source)
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PeftrunError(
            f"the {what} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})", where=source
        ) from None


def read_yaml_lines(
    path: str | os.PathLike[str], *, mapping: bool = True, what: str = "YAML file"
) -> tuple[Any, Lines]:
    """Read and parse a YAML file within the limits; the data and the line of every key path."""
    text = read_yaml_text(path, what=what)
    return parse_yaml_lines(text, source=str(path), mapping=mapping, what=what)


def read_yaml(path: str | os.PathLike[str], *, mapping: bool = True, what: str = "YAML file") -> Any:
    """Read and parse a YAML file within the limits: the one function for any YAML peftrun reads.

    `mapping=True` (the default) also refuses a top level that is not a mapping. Every refusal is a
    PeftrunError naming the file.
    """
    return read_yaml_lines(path, mapping=mapping, what=what)[0]
