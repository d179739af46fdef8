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
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

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
    """A spec section: frozen, unknown keys refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


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


def read_yaml(path: str | os.PathLike, source: str = "spec") -> dict[str, Any]:
    """The mapping in a YAML file, or ``SpecError`` naming what is wrong with the file."""
    p = Path(path)
    if not p.is_file():
        raise SpecError([("<file>", f"spec file not found (got {quote(str(path))})")], source)
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise SpecError([("<file>", f"not valid YAML in {str(path)!r}: {e}")], source) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError([("<root>", f"spec must be a mapping (got {quote(raw)})")], source)
    return raw


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


def reference_markdown(model: type[BaseModel]) -> str:
    """The fields of ``model`` as a markdown table (the docs' spec references)."""
    lines = ["| field | default | meaning |", "| --- | --- | --- |"]
    for field, default, desc in field_reference(model):
        lines.append(f"| `{field}` | `{default}` | {desc.replace('|', '/')} |")
    return "\n".join(lines)
