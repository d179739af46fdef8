"""The toolkit every spec is built on: the job, serving, tune and gate specs all use it.

* ``Section``: a frozen pydantic model that forbids unknown keys.
* ``UserError`` / ``SpecError``: bad input. The CLI maps ``UserError`` to exit code 2 in one place.
* ``read_yaml``, ``apply_overrides`` (``section.field=value``), ``set_path``: one walker for dotted keys.
* ``validate_spec``: schema plus cross-field checks, reporting every problem at once, each naming the
  dotted field and quoting the value.
* ``field_reference`` / ``reference_markdown``: the reference docs and ``--help``, generated from the
  fields' descriptions, their one and only documentation.

Imports neither Ray nor torch, so validation is instant.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

Problem = tuple[str, str]  # (dotted field, message)
S = TypeVar("S", bound=BaseModel)


class UserError(Exception):
    """Bad input from the user (a spec, an override, an argument, a missing registry entry): exit code 2."""


class SpecError(UserError):
    """A spec failed validation. ``problems`` lists every ``(field, message)``."""

    def __init__(self, problems: list[Problem], source: str = "spec"):
        self.problems = problems
        self.source = source
        lines = [f"invalid {source}: {len(problems)} problem(s)"]
        lines += [f"  - {field}: {msg}" for field, msg in problems]
        super().__init__("\n".join(lines))

    def __reduce__(self):  # picklable across Ray processes
        return (SpecError, (self.problems, self.source))


class Section(BaseModel):
    """A spec section: frozen, unknown keys refused, floats finite (no ``.inf`` / ``.nan``)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _not_bool(value: Any) -> Any:
    if isinstance(value, bool):  # pydantic would read True as 1
        raise ValueError("expected a number, not a boolean")
    return value


Int = Annotated[int, BeforeValidator(_not_bool)]  # an int field that refuses true/false
Float = Annotated[float, BeforeValidator(_not_bool)]  # a float field that refuses true/false
SEED_MAX = 2**32 - 1  # numpy and CUDA seeds are 32-bit
STEPS_MAX = 100_000_000


def quote(value: Any) -> str:
    """``repr(value)``, shortened to 80 characters: how every error quotes the bad value."""
    s = repr(value)
    return s if len(s) <= 80 else s[:77] + "..."


_UNION_TAG = re.compile(r"^(str|int|float|bool|[a-z-]+\[.*\])$")


def _loc(loc: tuple) -> str:
    # pydantic puts union-member tags ('str', 'list[str]', 'function-after[...]') into loc
    return ".".join(str(p) for p in loc if not (isinstance(p, str) and _UNION_TAG.match(p)))


def pydantic_problems(err: ValidationError) -> list[Problem]:
    """One problem per field, its messages joined, quoting the value pydantic saw."""
    seen: dict[str, list[str]] = {}
    values: dict[str, Any] = {}
    for e in err.errors():
        field = _loc(e["loc"]) or "<root>"
        msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
        seen.setdefault(field, [])
        if msg not in seen[field]:
            seen[field].append(msg)
        values[field] = e.get("input")
    return [(f, f"{'; '.join(m)} (got {quote(values[f])})") for f, m in seen.items()]


def validate_spec(
    schema: type[S],
    raw: dict[str, Any],
    semantic: Callable[[S], Iterable[Problem]] | None = None,
    source: str = "spec",
) -> S:
    """Validate ``raw`` against ``schema``, then run the cross-field checks ``semantic``.

    Every problem is reported at once: when a section fails the schema, the cross-field checks
    still run on the sections that did parse.

    Raises:
        SpecError: listing every problem, each naming the field and quoting the value.
    """
    semantic = semantic or (lambda _: [])
    try:
        spec = schema.model_validate(raw)
    except ValidationError as e:
        problems = pydantic_problems(e)
        broken = {f.split(".")[0] for f, _ in problems}
        try:
            partial = schema.model_validate({k: v for k, v in raw.items() if k not in broken})
            problems += [p for p in semantic(partial) if p[0].split(".")[0] not in broken]
        except ValidationError:
            pass
        raise SpecError(problems, source) from None
    problems = list(semantic(spec))
    if problems:
        raise SpecError(problems, source)
    return spec


# --------------------------------------------------------------------------- YAML and overrides


class _StrictLoader(yaml.SafeLoader):
    """A safe loader that refuses duplicate keys (PyYAML keeps the last one silently)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # <<: *defaults: its keys may be overridden here
            continue
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            duplicate = key in seen
        except TypeError:  # a list or mapping as a key
            raise yaml.constructor.ConstructorError(
                None, None, f"a key must be a plain value (got {quote(key)})", key_node.start_mark
            ) from None
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} on lines {seen[key]} and {line}", key_node.start_mark
            )
        seen[key] = line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _lines(node: yaml.Node, prefix: str = "", out: dict[str, int] | None = None) -> dict[str, int]:
    """Dotted field → line number (1-based) of every key in a composed YAML document."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            field = f"{prefix}{key_node.value}"
            out[field] = key_node.start_mark.line + 1
            _lines(value_node, field + ".", out)
    return out


def read_yaml_lines(path: str | os.PathLike, source: str = "spec") -> tuple[dict[str, Any], dict[str, int]]:
    """The mapping in a YAML file and the line of each dotted field, or ``SpecError`` naming what is wrong
    with the file: missing, not UTF-8 text, not YAML, a duplicate key, empty, or not a mapping."""
    p = Path(path)
    if not p.is_file():
        raise SpecError([("<file>", f"spec file not found (got {quote(str(path))})")], source)
    data = p.read_bytes()
    try:
        text = data.decode("utf-8")
        if "\x00" in text:
            raise UnicodeDecodeError("utf-8", data, text.index("\x00"), text.index("\x00") + 1, "NUL byte")
    except UnicodeDecodeError as e:
        raise SpecError(
            [("<file>", f"not a UTF-8 text file: {e.reason} at byte {e.start} (got {quote(str(path))})")], source
        ) from None
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
        lines = _lines(yaml.compose(text, Loader=yaml.SafeLoader)) if isinstance(raw, dict) else {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise SpecError([("<file>", f"not valid YAML{where}: {problem} (got {quote(str(path))})")], source) from None
    if raw is None:
        raise SpecError([("<file>", f"the file is empty: write at least one field (got {quote(str(path))})")], source)
    if not isinstance(raw, dict):
        raise SpecError([("<root>", f"spec must be a mapping of sections (got {quote(raw)})")], source)
    return raw, lines


def read_yaml(path: str | os.PathLike, source: str = "spec") -> dict[str, Any]:
    """The mapping in a YAML file (``read_yaml_lines`` without the lines)."""
    return read_yaml_lines(path, source)[0]


def load_file(
    path: str | os.PathLike,
    overrides: Iterable[str],
    validate: Callable[[dict[str, Any]], S],
    source: str = "spec",
) -> S:
    """Read a spec file strictly, apply ``section.field=value`` overrides, and ``validate`` the result.
    Each problem in a field the file set (and no override replaced) names its line in the file."""
    overrides = list(overrides)
    raw, lines = read_yaml_lines(path, source)
    raw = apply_overrides(raw, overrides)
    overridden = [parse_override(o)[0] for o in overrides]
    try:
        return validate(raw)
    except SpecError as e:
        problems = []
        for field, msg in e.problems:
            line = _line_of(field, lines)
            if line and not any(
                field == o or field.startswith(o + ".") or o.startswith(field + ".") for o in overridden
            ):
                msg = f"{msg} [{Path(path).name} line {line}]"
            problems.append((field, msg))
        raise SpecError(problems, e.source) from None


def _line_of(field: str, lines: dict[str, int]) -> int | None:
    """The line of ``field``, or of its nearest parent the file names (a missing key's section)."""
    parts = field.split(".")
    for n in range(len(parts), 0, -1):
        line = lines.get(".".join(parts[:n]))
        if line:
            return line
    return None


_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b.c=value`` → ("a.b.c", YAML-parsed value)."""
    if "=" not in item:
        raise SpecError([(item, "override must look like section.field=value")], "override")
    key, raw = item.split("=", 1)
    if not key or any(not p for p in key.split(".")):
        raise SpecError([(key or item, f"bad override key (got {quote(item)})")], "override")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and _FLOAT.match(value):  # YAML 1.1 reads 1e-4 as a string
        value = float(value)
    return key, value


def set_path(raw: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A copy of ``raw`` with the dotted field set to ``value`` (missing sections are created)."""
    out = copy.deepcopy(raw)
    node = out
    *parents, leaf = dotted.split(".")
    for p in parents:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[leaf] = value
    return out


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of ``raw`` with ``section.field=value`` overrides applied."""
    out = copy.deepcopy(raw)
    for item in overrides:
        out = set_path(out, *parse_override(item))
    return out


# --------------------------------------------------------------------------- docs


def field_reference(model: type[BaseModel], prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted field, default, description) for every field, in declaration order."""
    rows: list[tuple[str, str, str]] = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows += field_reference(ann, f"{prefix}{name}.")
            continue
        default = f.get_default(call_default_factory=True)
        rows.append((f"{prefix}{name}", repr(default), f.description or ""))
    return rows


def bounds(model: type[BaseModel], field: str) -> str:
    """The numeric bounds a field enforces, e.g. ``> 0, ≤ 65536`` (empty if none)."""
    *parents, leaf = field.split(".")
    for p in parents:
        model = model.model_fields[p].annotation
    out = []
    for c in model.model_fields[leaf].metadata:
        for attr, sign in (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤")):
            value = getattr(c, attr, None)
            if value is not None:
                out.append(f"{sign} {value:,}" if isinstance(value, int) else f"{sign} {value:g}")
    return ", ".join(out)


def reference_markdown(model: type[BaseModel]) -> str:
    """The fields of ``model`` as a markdown table (the docs' spec references)."""
    lines = ["| field | default | allowed | meaning |", "| --- | --- | --- | --- |"]
    for field, default, desc in field_reference(model):
        lines.append(f"| `{field}` | `{default}` | {bounds(model, field)} | {desc.replace('|', '/')} |")
    return "\n".join(lines)
