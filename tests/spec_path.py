"""Follow a job spec through the code from the Ray Train worker, and count how often its path comes back to a
file it had left. ``python tests/spec_path.py [--show] [--no-spec-methods] [--held]``.

Static, from the source: starting at ``train_worker(config)``, every call in source order that is handed the
spec (``config``, ``spec``, or anything assigned from them, as an argument or as the object of an attribute
call: ``w.spec``, ``spec.data``) and that resolves to a function or a ``JobSpec`` method of the product is a
*stop*; the walk goes into each function once, depth first. A *return* is a stop in a file that an earlier
stop was in, after a stop in another file.

What carries the spec, by default: anything assigned from an expression that mentions a carrying name (the
base model loaded from the spec, a batch, a field's value), and any argument that mentions one. ``--held``
counts only the spec itself and what holds it: a name carries it when it is bound to a carrying name or to
its ``.spec`` / ``["spec"]``, or to the result of a product call whose return annotation holds it
(``JobSpec``, or a class with a ``JobSpec`` field, such as the worker's ``Worker``); an argument hands the
spec on when it is a carrying name or its ``.spec`` / ``["spec"]``."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module_file(module: str) -> Path | None:
    base = ROOT / module.replace(".", "/")
    for p in (base.with_suffix(".py"), base / "__init__.py"):
        if p.is_file():
            return p
    return None


class _Module:
    def __init__(self, name: str, path: Path):
        self.name, self.path = name, path
        self.tree = ast.parse(path.read_text())
        self.defs = {n.name: n for n in self.tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        self.imports = _imports(self.tree.body, name)


def _imports(body, current: str) -> dict[str, tuple[str, str | None]]:
    """name → (module, attribute or None for a module), for ``from X import a [as b]`` statements in ``body``."""
    out = {}
    for node in body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipelines"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out[a.asname or a.name] = (sub, None) if _module_file(sub) else (node.module, a.name)
    return out


_MODULES: dict[str, _Module] = {}


def _module(name: str) -> _Module | None:
    if name not in _MODULES:
        path = _module_file(name)
        if path is None:
            return None
        _MODULES[name] = _Module(name, path)
    return _MODULES[name]


def _resolve(module: _Module, name: str, seen: set[str] = frozenset()) -> tuple[_Module, ast.AST] | None:
    """The definition ``name`` means in ``module``, following re-exports (an ``__init__`` that imports it)."""
    if name in module.defs:
        return module, module.defs[name]
    if name in module.imports and module.name not in seen:
        target, attr = module.imports[name]
        m = _module(target)
        if m is not None and attr is not None:
            return _resolve(m, attr, seen | {module.name})
    return None


def _mentions(node: ast.AST, carrying: set[str]) -> bool:
    return any(isinstance(n, ast.Name) and n.id in carrying for n in ast.walk(node))


SECTIONS = {"model", "method", "data", "train", "scaling", "checkpoint", "tracking"}  # JobSpec's own sections


def _is_spec(node: ast.AST, carrying: set[str], section: bool = True) -> bool:
    """``node`` is a carrying name, its ``.spec`` / ``["spec"]``, or (``section``) one of its sections
    (``spec.data``: a part of the spec, where ``spec.data.format`` is a value)."""
    if isinstance(node, ast.Name):
        return node.id in carrying
    if isinstance(node, ast.Attribute) and node.attr == "spec":
        return _is_spec(node.value, carrying, section)
    if section and isinstance(node, ast.Attribute) and node.attr in SECTIONS:
        return _is_spec(node.value, carrying, False)
    if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and node.slice.value == "spec":
        return _is_spec(node.value, carrying, section)
    return False


def _holds_spec(module: _Module, fn: ast.AST) -> bool:
    """A function whose return annotation is ``JobSpec`` or a product class with a ``JobSpec`` field."""
    ann = getattr(fn, "returns", None)
    name = ann.value if isinstance(ann, ast.Constant) else getattr(ann, "id", None)
    if name == "JobSpec":
        return True
    found = _resolve(module, name) if isinstance(name, str) else None  # a class of its module, or one it imports
    cls = found[1] if found else None
    return isinstance(cls, ast.ClassDef) and any(
        isinstance(f, ast.AnnAssign) and "JobSpec" in ast.unparse(f.annotation) for f in cls.body
    )


def _jobspec() -> tuple[_Module, dict[str, ast.AST]]:
    for name in ("pipelines.spec.job", "pipelines.spec"):
        m = _module(name)
        if m is not None and "JobSpec" in m.defs:
            cls = m.defs["JobSpec"]
            return m, {f.name: f for f in cls.body if isinstance(f, ast.FunctionDef)}
    raise SystemExit("JobSpec not found")


def follow(
    start_module: str, start: str, carrying: set[str], spec_methods_too: bool = True, derived: bool = True
) -> list[tuple[str, str]]:
    """The stops, in order: (file, function). ``spec_methods_too`` False: ``JobSpec``'s own methods are not stops.
    ``derived``: what is computed from the spec carries it too (the module docstring)."""
    stops: list[tuple[str, str]] = []
    visited: set[tuple[str, str]] = set()
    spec_module, spec_methods = _jobspec()

    handed = _mentions if derived else _is_spec

    def _binds_spec(value: ast.AST, carrying: set[str]) -> bool:
        if _is_spec(value, carrying):
            return True
        if not isinstance(value, ast.Call) or not any(_is_spec(a, carrying) for a in value.args):
            return False
        target = callee(value.func)
        return target is not None and _holds_spec(*target)

    def callee(f: ast.AST) -> tuple[_Module, ast.AST] | None:
        if isinstance(f, ast.Name):
            if f.id in current[0].defs:
                return current[0], current[0].defs[f.id]
            if f.id in current[1]:
                mod, attr = current[1][f.id]
                m = _module(mod)
                return _resolve(m, attr) if m and attr else None
        return None

    current: list = [None, None]

    def walk(module: _Module, fn: ast.FunctionDef, carrying: set[str]) -> None:
        local = dict(module.imports)
        local.update(_imports([n for n in ast.walk(fn) if isinstance(n, ast.ImportFrom)], module.name))
        nodes = sorted(
            (n for n in ast.walk(fn) if isinstance(n, (ast.Call, ast.Assign, ast.AnnAssign))),
            key=lambda n: (n.lineno, n.col_offset, not isinstance(n, ast.Call)),
        )
        for node in nodes:
            current[:] = [module, local]
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                pairs = [(t, node.value) for t in targets]
                if not derived and isinstance(node.value, ast.Tuple):  # a, b = x.spec, x.device
                    pairs = [p for t in targets if isinstance(t, ast.Tuple) for p in zip(t.elts, node.value.elts)]
                for target, value in pairs:
                    if _mentions(value, carrying) if derived else _binds_spec(value, carrying):
                        carrying |= {
                            t.id for t in ast.walk(target) if isinstance(t, ast.Name) and isinstance(t.ctx, ast.Store)
                        }
                continue
            if not isinstance(node, ast.Call):
                continue
            args = [*node.args, *(k.value for k in node.keywords)]
            f = node.func
            target = None
            if isinstance(f, ast.Attribute) and _mentions(f.value, carrying) and f.attr in spec_methods:
                if not spec_methods_too:
                    continue
                target = (spec_module, spec_methods[f.attr])  # spec.deepspeed_config() and the like
            elif not any(handed(a, carrying) for a in args):
                continue
            elif isinstance(f, ast.Name):
                if f.id in module.defs:
                    target = (module, module.defs[f.id])
                elif f.id in local:
                    mod, attr = local[f.id]
                    m = _module(mod)
                    target = _resolve(m, attr) if m and attr else None
            elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id in local:
                mod, attr = local[f.value.id]
                m = _module(mod if attr is None else f"{mod}.{attr}")
                target = _resolve(m, f.attr) if m else None
            if target is None or not isinstance(target[1], ast.FunctionDef):
                continue
            tm, tf = target
            stops.append((str(tm.path.relative_to(ROOT)), tf.name))
            if (tm.name, tf.name) in visited:
                continue
            visited.add((tm.name, tf.name))
            params = [a.arg for a in tf.args.args]
            passed = {params[i] for i, a in enumerate(node.args) if i < len(params) and handed(a, carrying)}
            passed |= {k.arg for k in node.keywords if k.arg and handed(k.value, carrying)}
            if tm is spec_module and tf.name in spec_methods:
                passed.add("self")
            walk(tm, tf, set(passed))

    m = _module(start_module)
    fn = m.defs[start]
    visited.add((m.name, start))
    walk(m, fn, set(carrying))
    return stops


def returns(stops: list[tuple[str, str]]) -> int:
    left, count, prev = set(), 0, None
    for file, _ in stops:
        if file != prev:
            if file in left:
                count += 1
            if prev is not None:
                left.add(prev)
        prev = file
    return count


def main() -> int:
    worker = next(m for m in ("pipelines.train.worker", "pipelines.loop") if _module_file(m))
    stops = follow(
        worker,
        "train_worker",
        {"config"},
        spec_methods_too="--no-spec-methods" not in sys.argv,
        derived="--held" not in sys.argv,
    )
    if "--show" in sys.argv:
        for file, fn in stops:
            print(f"  {file}: {fn}")
    files = {f for f, _ in stops}
    print(f"{len(stops)} stops in {len(files)} files; {returns(stops)} returns to a file left before")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
