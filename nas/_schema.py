"""Reading plain data (parsed YAML) into typed, frozen dataclasses, and back.

Specs and search spaces share this reader so both give the same one-line errors with exact field
paths (``blocks[3].kernel: 4 is not one of 3, 5, 7``). It is written here rather than taken from a
library because none of torch, optuna, pandas or pyyaml validates into dataclasses, and the error
format (a path into the YAML document) is part of this project's interface.

Types understood: ``int``, ``float``, ``bool``, ``str``, ``Literal[...]``, ``Annotated[T, OneOf(values)]`` (a
registry's choices, see ``nas.registry``), nested dataclasses, ``tuple[X, ...]``, ``X | None`` and
``Mapping[str, Any]`` (free-form, copied read-only). Value
checks beyond the type live in each dataclass's ``__post_init__``, which raises :class:`SpecError`
naming the field; the reader prefixes the path of the enclosing object.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import stat
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, Union

import yaml

T = TypeVar("T")

MAX_FILE_BYTES = 1 << 20  # 1 MiB: a spec of thousands of blocks is well under; anything larger is a mistake


class SpecError(ValueError):
    """Invalid user input (spec, search space, file), with the path of the offending field."""

    def __init__(self, path: str, message: str, *, source: str = ""):
        self.path = path
        self.message = message
        self.source = source  # the file the data came from, when there is one
        parts = [x for x in (source, path, message) if x]
        super().__init__(": ".join(parts))

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled by its fields, not by its joined message: it crosses from a worker process (nas verify --jobs).
        return _spec_error, (self.path, self.message, self.source)

    def in_file(self, source: str | os.PathLike[str]) -> SpecError:
        """The same error, attributed to the file ``source``."""
        return SpecError(self.path, self.message, source=str(source))

    def within(self, prefix: str) -> SpecError:
        """The same error, seen from an enclosing object at ``prefix``."""
        if not prefix:
            return self
        joined = prefix + (self.path if self.path.startswith("[") else "." + self.path) if self.path else prefix
        return SpecError(joined, self.message, source=self.source)


def _spec_error(path: str, message: str, source: str) -> SpecError:
    return SpecError(path, message, source=source)


def _join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "a mapping"}.get(type(value), type(value).__name__)


def fmt_choices(values: typing.Iterable[Any]) -> str:
    return ", ".join(repr(v) if isinstance(v, str) else str(v) for v in values)


# Limits on what a description may ask for, checked before anything is allocated. Every MobileNet is far inside
# them (its widest layer has 1,280 channels, its deepest 17 blocks); a value beyond one is a mistake, or an attack.
MAX_CHANNELS = 16_384
MAX_RESOLUTION = 4_096
MAX_CLASSES = 100_000
MAX_BLOCKS = 256
MAX_VALUES = 100_000  # scalars, lists and mappings in one file, after YAML aliases are expanded
MAX_NESTING = 32
MAX_SHOWN = 60  # characters of a value echoed in an error message


def cut(text: str, limit: int = MAX_SHOWN) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def shown(value: Any) -> str:
    """``value`` as an error message shows it: strings quoted, anything long cut."""
    if isinstance(value, int) and abs(value) >= 10**50:
        return f"an integer of {len(str(abs(value)))} digits"
    return cut(repr(value) if isinstance(value, str) else str(value))


def check_choice(path: str, value: Any, allowed: typing.Iterable[Any]) -> None:
    allowed = tuple(allowed)
    # The type must match too: 3.0 == 3 and True == 1 in Python, but neither is a kernel size.
    if type(value) not in {type(a) for a in allowed} or value not in allowed:
        raise SpecError(path, f"{shown(value)} is not one of {fmt_choices(allowed)}")


@dataclass(frozen=True)
class OneOf:
    """``Annotated[T, OneOf(values)]``: a field whose value must be one of ``values``."""

    values: tuple[Any, ...]


def choices_of(tp: Any) -> tuple[Any, ...] | None:
    """The allowed values of a choice type (``Literal`` or ``Annotated[..., OneOf]``); None for other types."""
    if typing.get_origin(tp) is typing.Literal:
        return typing.get_args(tp)
    if typing.get_origin(tp) is typing.Annotated:
        return next((m.values for m in tp.__metadata__ if isinstance(m, OneOf)), None)
    return None


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    return tp


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


@functools.cache
def _choice_fields(cls: type) -> tuple[tuple[str, tuple[Any, ...], bool], ...]:
    """(name, allowed values, is a tuple of choices) for each choice-typed field of dataclass ``cls``."""
    found = []
    for f in dataclasses.fields(cls):
        tp = _strip_optional(_hints(cls)[f.name])
        many = typing.get_origin(tp) is tuple
        allowed = choices_of(typing.get_args(tp)[0] if many else tp)
        if allowed is not None:
            found.append((f.name, allowed, many))
    return tuple(found)


def check_choices(obj: Any) -> None:
    """Check every choice-typed field of a dataclass instance (``Literal``, ``OneOf``, and tuples of them), so
    objects built in code are checked as strictly as ones read from YAML. A None of an optional field passes."""
    for name, allowed, many in _choice_fields(type(obj)):
        value = getattr(obj, name)
        if value is None:
            continue
        for i, v in enumerate(value) if many else ((None, value),):
            check_choice(name if i is None else f"{name}[{i}]", v, allowed)


def check_positive(path: str, value: int | float, limit: int | float | None = None) -> None:
    """``value`` > 0, finite, and at most ``limit`` when given."""
    if isinstance(value, float) and not math.isfinite(value):
        raise SpecError(path, f"{shown(value)} is not a finite number")
    if not value > 0:
        raise SpecError(path, f"{shown(value)} must be positive")
    if limit is not None and value > limit:
        raise SpecError(path, f"{shown(value)} is over the limit of {limit:,}")


def _read(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Union or origin is types.UnionType:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _read(inner, value, path)
    allowed = choices_of(tp)
    if allowed is not None:
        check_choice(path, value, allowed)
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise SpecError(path, f"expected a list, got {_type_name(value)}")
        (inner, _) = typing.get_args(tp)
        return tuple(_read(inner, v, _join(path, i)) for i, v in enumerate(value))
    if origin is Mapping or tp is Mapping:
        if not isinstance(value, dict):
            raise SpecError(path, f"expected a mapping, got {_type_name(value)}")
        for k in value:
            if not isinstance(k, str):
                raise SpecError(path, f"key {k!r} must be a string")
        return types.MappingProxyType(dict(value))
    if dataclasses.is_dataclass(tp):
        return from_data(tp, value, path)  # type: ignore[arg-type]
    if tp is bool:
        if not isinstance(value, bool):
            raise SpecError(path, f"expected true or false, got {_type_name(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(path, f"expected an integer, got {_type_name(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SpecError(path, f"expected a number, got {_type_name(value)}")
        if not math.isfinite(value):
            raise SpecError(path, f"{shown(value)} is not a finite number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise SpecError(path, f"expected a string, got {_type_name(value)}")
        return value
    raise TypeError(f"unsupported field type {tp!r}")  # a bug in a dataclass here, not user input


def from_data(cls: type[T], data: Any, path: str = "") -> T:
    """Build dataclass ``cls`` from parsed YAML, raising :class:`SpecError` at the exact field."""
    if not isinstance(data, dict):
        raise SpecError(path, f"expected a mapping, got {_type_name(data)}")
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key in data:
        if key not in fields:
            raise SpecError(_join(path, str(key)), f"unknown key (allowed: {', '.join(fields)})")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise SpecError(_join(path, name), "missing")
            continue
        kwargs[name] = _read(hints[name], data[name], _join(path, name))
    try:
        return cls(**kwargs)
    except SpecError as e:
        raise e.within(path) from None


def to_data(obj: Any) -> Any:
    """The plain-data (YAML-ready) form of a dataclass tree; inverse of :func:`from_data`."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        # A field added after caches were keyed on its class (metadata omit_default) is left out at its default, so
        # the supernets and trained networks cached before it existed keep their keys; from_data restores it.
        return {f.name: to_data(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not (f.metadata.get("omit_default") and getattr(obj, f.name) == f.default)}
    if isinstance(obj, tuple):
        return [to_data(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_data(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_data(v) for v in obj]
    return obj


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that refuses duplicate keys, which PyYAML otherwise resolves silently."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
        mark = key_node.start_mark
        if not isinstance(key, (str, int, float, bool)) and key is not None:
            raise yaml.constructor.ConstructorError(None, None, f"a key must be a plain value, not "
                                                    f"{_type_name(key)} (line {mark.line + 1})", mark)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (line {mark.line + 1})", mark)
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: str | os.PathLike[str], what: str) -> Any:
    """Safely parse a YAML file; any problem is a :class:`SpecError` naming the file."""
    p = Path(path)
    try:
        st = p.stat()
        size = st.st_size
        if p.is_dir():
            raise SpecError("", source=str(p), message=f"is a directory, not a {what} file")
        if not stat.S_ISREG(st.st_mode):  # a FIFO or /dev/urandom would hang or never end
            raise SpecError("", source=str(p), message=f"is not a regular file, so not a {what} file")
        if size > MAX_FILE_BYTES:
            limit = f"the {MAX_FILE_BYTES} byte limit for a {what}"
            raise SpecError("", source=str(p), message=f"{size} bytes is over {limit}")
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError("", source=str(p), message="no such file") from None
    except UnicodeDecodeError:
        raise SpecError("", source=str(p), message="not UTF-8 text") from None
    except OSError as e:
        raise SpecError("", source=str(p), message=e.strerror or str(e)) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SpecError("", source=str(p), message=f"not valid YAML{where}: {cut(problem, 200)}") from None
    except RecursionError:
        raise SpecError("", source=str(p), message=f"nested too deeply for a {what}") from None
    except ValueError as e:  # an integer of more than Python's 4,300 digits
        raise SpecError("", source=str(p), message=f"not valid YAML: {cut(str(e), 200)}") from None
    if data is None:
        raise SpecError("", source=str(p), message=f"empty file, expected a {what}")
    _check_size(data, what, str(p))
    return data


def _check_size(data: Any, what: str, source: str) -> None:
    """Refuse documents too nested or, after YAML aliases are expanded, too large (a few lines of aliases can stand
    for millions of values), walking without recursion."""
    stack, count = [(data, 0)], 0
    while stack:
        value, depth = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise SpecError("", source=source, message=f"more than {MAX_VALUES:,} values (after YAML aliases are "
                                                       f"expanded): too large for a {what}")
        if depth > MAX_NESTING:
            raise SpecError("", source=source, message=f"nested more than {MAX_NESTING} levels deep: not a {what}")
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((c, depth + 1) for c in children)


TEMP_SUFFIX = ".tmp"


def write_atomic(path: str | os.PathLike[str], write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it over ``path``: readers (and a
    run killed half-way) never see half a file. Every file this project writes goes through here. A failure
    (permission, a full disk) removes the temporary file and is a SpecError naming ``path``."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}{TEMP_SUFFIX}")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, p)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as a RuntimeError naming no file
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise SpecError("", f"cannot write it: {_reason(e)}", source=str(p)) from None


def _reason(e: BaseException) -> str:
    return cut(e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0] if str(e) else
               type(e).__name__, 200)


def ensure_writable(folder: str | os.PathLike[str], what: str) -> Path:
    """Create ``folder`` if needed and prove a file can be written there, before any expensive step."""
    p = Path(folder)
    probe = p / f".write-probe.{os.getpid()}{TEMP_SUFFIX}"
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise SpecError("", f"cannot write the {what} there: {_reason(e)}", source=str(p)) from None
    return p


def sweep_temp(folder: str | os.PathLike[str]) -> int:
    """Remove temporary files that killed processes left under ``folder`` (``.NAME.PID.tmp`` of a PID no longer
    running); returns how many."""
    removed = 0
    for tmp in Path(folder).rglob(f".*{TEMP_SUFFIX}"):
        pid = tmp.name[:-len(TEMP_SUFFIX)].rsplit(".", 1)[-1]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        with contextlib.suppress(OSError):
            tmp.unlink() if tmp.is_file() else None
            removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_yaml_atomic(data: Any, path: str | os.PathLike[str], header: str = "") -> None:
    text = header + yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120)
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(data: Any, path: str | os.PathLike[str], indent: int = 2) -> None:
    text = json.dumps(data, indent=indent)
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


RESULTS_ENV = "NAS_RESULTS"


def results_root(results: str | os.PathLike[str] | None = None) -> Path:
    """The folder every output goes under: ``results`` when given, else ``$NAS_RESULTS``, else ``./results``."""
    return Path(results if results is not None else os.environ.get(RESULTS_ENV) or "results")


def digest(*parts: Any, length: int = 10) -> str:
    """A short stable hash of plain data or dataclass trees: the one key of every cache file (supernets, trained
    networks, latency tables)."""
    text = json.dumps(to_data(list(parts)), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:length]
