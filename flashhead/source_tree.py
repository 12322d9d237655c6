"""An index of a vLLM source tree (`vllm/**/*.py`) read with `ast` only: vLLM is never imported.

`SourceTree` resolves `module:Qualified.name` to its definition (classes, methods including
those inherited from base classes defined in the tree, properties, module-level functions and
assignments), following `from x import Y` and `class X(Base)` where that is a plain name or
attribute chain. `flashhead.staticcheck` checks patchsets against it.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

# Decorators that make a method behave like an attribute: the "signature" is the getter's.
_PROPERTY_DECORATORS = {"property", "cached_property", "functools.cached_property"}
# Model-registry dicts that do *not* list servable architectures.
_NOT_SERVABLE_TABLES = {"_PREVIOUSLY_SUPPORTED_MODELS", "_OOT_SUPPORTED_MODELS"}
REGISTRY_MODULE = "vllm.model_executor.models.registry"
_MAX_DEPTH = 24  # import / inheritance chains longer than this are treated as unresolvable


class SourceTreeError(ValueError):
    """The directory given is not a vLLM source tree."""


@dataclass(frozen=True)
class Definition:
    """Where a name is defined in the tree."""

    module: str
    qualname: str
    kind: str  # class | function | method | property | assignment | module
    node: ast.AST | None
    path: Path
    inherited_from: str | None = None  # "module:Class" when found on a base class

    @property
    def location(self) -> str:
        return f"{self.module}:{self.qualname}"

    @property
    def lineno(self) -> int:
        return getattr(self.node, "lineno", 0)

    @property
    def decorators(self) -> list[str]:
        return [_dotted(d) for d in getattr(self.node, "decorator_list", [])]


@dataclass
class _Module:
    name: str
    path: Path
    is_package: bool
    tree: ast.Module
    defs: dict[str, ast.AST] = field(default_factory=dict)
    imports: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # alias -> (mod, attr)


class SourceTree:
    """Lazy, cached index of a vLLM source tree (a directory that contains `vllm/`)."""

    def __init__(self, root: Path | str):
        root = Path(root)
        if (root / "vllm" / "__init__.py").is_file():
            self.root = root
        elif root.name == "vllm" and (root / "__init__.py").is_file():
            self.root = root.parent
        else:
            raise SourceTreeError(
                f"{root}: not a vLLM source tree (expected {root}/vllm/__init__.py); pass the "
                "directory that contains vllm/, e.g. one made by `flashhead patchsets check "
                "--vllm-version X`"
            )
        self._modules: dict[str, _Module | None] = {}
        self._texts: dict[Path, str] | None = None

    # ---- modules -------------------------------------------------------------------------
    def module_file(self, module: str) -> Path | None:
        base = self.root.joinpath(*module.split("."))
        for cand in (base.with_suffix(".py"), base / "__init__.py"):
            if cand.is_file():
                return cand
        return None

    def has_module(self, module: str) -> bool:
        return self.module_file(module) is not None

    def _module(self, module: str) -> _Module | None:
        if module in self._modules:
            return self._modules[module]
        path = self.module_file(module)
        info = None
        if path is not None:
            try:
                tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"), str(path))
            except SyntaxError:
                tree = None
            if tree is not None:
                info = _Module(module, path, path.name == "__init__.py", tree)
                _collect(info, tree.body)
        self._modules[module] = info
        return info

    def all_modules(self) -> Iterator[tuple[str, Path]]:
        for path in sorted((self.root / "vllm").rglob("*.py")):
            rel = path.relative_to(self.root).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts.pop()
            yield ".".join(parts), path

    # ---- resolution ------------------------------------------------------------------------
    def resolve(self, target: str) -> Definition | None:
        """`module:Qualified.name` -> its definition, or None when the tree does not define it."""
        module, _, qual = target.partition(":")
        if not qual:
            return self._module_def(module)
        parts = qual.split(".")
        found = self._resolve_name(module, parts[0], 0)
        for part in parts[1:]:
            if found is None:
                return None
            found = self._member(found, part, 0)
        return found

    def _module_def(self, module: str) -> Definition | None:
        info = self._module(module)
        if info is None:
            return None
        return Definition(module, "", "module", info.tree, info.path)

    def _resolve_name(self, module: str, name: str, depth: int) -> Definition | None:
        if depth > _MAX_DEPTH:
            return None
        info = self._module(module)
        if info is None:
            return None
        node = info.defs.get(name)
        if node is not None:
            return Definition(module, name, _kind(node, in_class=False), node, info.path)
        if name in info.imports:
            src_mod, attr = info.imports[name]
            if attr is None:
                return self._module_def(src_mod)
            found = self._resolve_name(src_mod, attr, depth + 1)
            if found is None and self.has_module(f"{src_mod}.{attr}"):
                found = self._module_def(f"{src_mod}.{attr}")
            return found
        if info.is_package and self.has_module(f"{module}.{name}"):
            return self._module_def(f"{module}.{name}")
        return None

    def _member(self, owner: Definition, name: str, depth: int) -> Definition | None:
        if owner.kind == "module":
            return self._resolve_name(owner.module, name, depth + 1)
        if owner.kind != "class":
            return None
        for cls, via in self._mro(owner):
            node = _class_member(cls.node, name)
            if node is not None:
                return Definition(
                    cls.module,
                    f"{cls.qualname}.{name}",
                    _kind(node, in_class=True),
                    node,
                    cls.path,
                    inherited_from=via,
                )
        return None

    def _mro(self, cls: Definition) -> Iterator[tuple[Definition, str | None]]:
        """The class, then its in-tree bases depth-first, left to right (no C3: good enough for
        "which definition wins" in vLLM's simple hierarchies)."""
        seen: set[str] = set()
        stack: list[tuple[Definition, int]] = [(cls, 0)]
        while stack:
            cur, depth = stack.pop(0)
            if cur.location in seen or depth > _MAX_DEPTH:
                continue
            seen.add(cur.location)
            yield cur, (None if cur is cls else cur.location)
            bases = [self._resolve_expr(cur.module, b, depth) for b in cur.node.bases]
            # `Base = OtherClass` aliases: inherit from the class the alias names.
            bases = [follow_alias(b, self) if b is not None else None for b in bases]
            stack[0:0] = [(b, depth + 1) for b in bases if b is not None and b.kind == "class"]

    def bases(self, cls: Definition) -> list[str]:
        """Base classes as written in the source (for messages)."""
        return [_dotted(b) for b in getattr(cls.node, "bases", [])]

    def _resolve_expr(self, module: str, expr: ast.expr, depth: int) -> Definition | None:
        if isinstance(expr, ast.Subscript):  # Generic[T], Base[Foo]
            expr = expr.value
        chain = _dotted(expr)
        if not chain or "<" in chain:
            return None
        parts = chain.split(".")
        found = self._resolve_name(module, parts[0], depth + 1)
        for part in parts[1:]:
            if found is None:
                return None
            found = self._member(found, part, depth + 1)
        return found

    # ---- search ---------------------------------------------------------------------------
    def find_by_tail(self, qualname: str) -> list[tuple[str, Definition]]:
        """Every definition of `Qualified.name` anywhere in the tree (the qualified tail of a
        target), e.g. `GPUModelRunner.execute_model` in whichever module defines that class, as
        (target spelled in that module, definition) pairs."""
        head = qualname.split(".")[0]
        if "." in qualname:
            pattern = re.compile(rf"^\s*class\s+{re.escape(head)}\b", re.M)
        else:
            pattern = re.compile(
                rf"^(?:async\s+def|def|class)\s+{re.escape(head)}\b|^{re.escape(head)}\s*[:=]", re.M
            )
        out = []
        for module, path in self.all_modules():
            if head not in self._text(path) or not pattern.search(self._text(path)):
                continue
            info = self._module(module)
            if info is None or head not in info.defs:
                continue  # only definitions, not re-exports
            found = self.resolve(f"{module}:{qualname}")
            if found is not None:
                out.append((f"{module}:{qualname}", found))
        return out

    def _text(self, path: Path) -> str:
        if self._texts is None:
            self._texts = {}
        if path not in self._texts:
            self._texts[path] = path.read_text(encoding="utf-8", errors="replace")
        return self._texts[path]

    # ---- vLLM specifics ---------------------------------------------------------------------
    def registry_architectures(self) -> set[str] | None:
        """Architecture names vLLM serves: keys of `_VLLM_MODELS` in the registry module (the
        union of the `_*_MODELS` tables it splats), or None when the module is absent."""
        info = self._module(REGISTRY_MODULE)
        if info is None:
            return None
        tables: dict[str, ast.Dict] = {}
        for name, node in info.defs.items():
            value = getattr(node, "value", None)
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(value, ast.Dict):
                tables[name] = value

        def keys(name: str, seen: set[str]) -> set[str]:
            if name in seen or name not in tables:
                return set()
            seen.add(name)
            out: set[str] = set()
            for k, v in zip(tables[name].keys, tables[name].values):
                if k is None and isinstance(v, ast.Name):  # {**_OTHER_MODELS}
                    out |= keys(v.id, seen)
                elif isinstance(k, ast.Constant) and isinstance(k.value, str):
                    out.add(k.value)
            return out

        if "_VLLM_MODELS" in tables:
            return keys("_VLLM_MODELS", set())
        out: set[str] = set()
        for name in tables:
            if name.endswith("_MODELS") and name not in _NOT_SERVABLE_TABLES:
                out |= keys(name, set())
        return out


# ---- module-level collection -----------------------------------------------------------------
def _collect(info: _Module, body: Iterable[ast.stmt]) -> None:
    for stmt in body:
        if isinstance(stmt, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            info.defs[stmt.name] = stmt
        elif isinstance(stmt, ast.Assign):
            for tgt in stmt.targets:
                for name in _target_names(tgt):
                    info.defs[name] = stmt
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            info.defs[stmt.target.id] = stmt
        elif isinstance(stmt, ast.ImportFrom):
            src = _absolute(info, stmt)
            for alias in stmt.names:
                if alias.name != "*":
                    info.imports[alias.asname or alias.name] = (src, alias.name)
        elif isinstance(stmt, ast.Import):
            for alias in stmt.names:
                if alias.asname:
                    info.imports[alias.asname] = (alias.name, None)
                else:
                    top = alias.name.split(".")[0]
                    info.imports[top] = (top, None)
        elif isinstance(stmt, ast.If):
            # `if TYPE_CHECKING:` / version switches: both branches may define the name; the
            # first definition seen wins, as for the common "if/else fallback" pattern.
            _collect_missing(info, stmt.body)
            _collect_missing(info, stmt.orelse)
        elif isinstance(stmt, ast.Try):
            _collect_missing(info, stmt.body)
            for handler in stmt.handlers:
                _collect_missing(info, handler.body)
            _collect_missing(info, stmt.orelse)
            _collect_missing(info, stmt.finalbody)


def _collect_missing(info: _Module, body: list[ast.stmt]) -> None:
    sub = _Module(info.name, info.path, info.is_package, info.tree)
    _collect(sub, body)
    for k, v in sub.defs.items():
        info.defs.setdefault(k, v)
    for k, v in sub.imports.items():
        if k not in info.defs:
            info.imports.setdefault(k, v)


def _absolute(info: _Module, stmt: ast.ImportFrom) -> str:
    if not stmt.level:
        return stmt.module or ""
    pkg = info.name.split(".")
    if not info.is_package:
        pkg = pkg[:-1]
    if stmt.level > 1:
        pkg = pkg[: len(pkg) - (stmt.level - 1)]
    return ".".join(pkg + ([stmt.module] if stmt.module else []))


def _target_names(tgt: ast.expr) -> list[str]:
    if isinstance(tgt, ast.Name):
        return [tgt.id]
    if isinstance(tgt, (ast.Tuple, ast.List)):
        return [n for elt in tgt.elts for n in _target_names(elt)]
    return []


def _class_member(cls: ast.ClassDef, name: str) -> ast.AST | None:
    found = None
    for stmt in cls.body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if stmt.name == name and found is None:
                found = stmt
        elif isinstance(stmt, ast.Assign):
            if any(name in _target_names(t) for t in stmt.targets) and found is None:
                found = stmt
        elif isinstance(stmt, ast.AnnAssign):
            if isinstance(stmt.target, ast.Name) and stmt.target.id == name and found is None:
                found = stmt
    if found is None:
        found = _instance_attribute(cls, name)
    return found


def _instance_attribute(cls: ast.ClassDef, name: str) -> ast.AST | None:
    """`self.name = ...` in one of the class's own methods (instance state set in __init__ etc.)."""
    for stmt in cls.body:
        if not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(stmt):
            targets = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
                targets = [node.target]
            for t in targets:
                if (
                    isinstance(t, ast.Attribute)
                    and t.attr == name
                    and isinstance(t.value, ast.Name)
                    and t.value.id == "self"
                ):
                    return node
    return None


def _kind(node: ast.AST, *, in_class: bool) -> str:
    if isinstance(node, ast.ClassDef):
        return "class"
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        if not in_class:
            return "function"
        decos = {_dotted(d) for d in node.decorator_list}
        if decos & _PROPERTY_DECORATORS:
            return "property"
        return "method"
    if isinstance(node, (ast.AugAssign, ast.AnnAssign)):
        targets = [node.target]
    else:
        targets = getattr(node, "targets", [])
    if any(isinstance(t, ast.Attribute) for t in targets):
        return "attribute"  # self.x = ... in a method
    return "assignment"


def _dotted(expr: ast.expr) -> str:
    """`a.b.C` -> "a.b.C"; a call decorator `@x.register('y')` -> "x.register"."""
    if isinstance(expr, ast.Call):
        expr = expr.func
    if isinstance(expr, ast.Name):
        return expr.id
    if isinstance(expr, ast.Attribute):
        head = _dotted(expr.value)
        return f"{head}.{expr.attr}" if head else ""
    return ""


def follow_alias(defn: Definition, tree: SourceTree) -> Definition:
    """`LLMEngine = V1LLMEngine` / `f = other.g`: the definition the assignment names."""
    for _ in range(_MAX_DEPTH):
        if defn.kind != "assignment" or not isinstance(defn.node, (ast.Assign, ast.AnnAssign)):
            return defn
        value = defn.node.value
        if not isinstance(value, (ast.Name, ast.Attribute)):
            return defn
        found = tree._resolve_expr(defn.module, value, 0)
        if found is None:
            return defn
        defn = found
    return defn
