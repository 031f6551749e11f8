"""Declarative argument schemas for RPC methods, and their compiler.

A method's arguments are declared with ``Arg``/``Value``; ``Schema``
checks a request's ``args`` map against them before a handler runs.  Each
schema is compiled once into one generated function (``_SchemaCompiler``),
because every request passes through it; the generated code is equivalent
to ``Schema.validate_slow``, which tests check it against.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from surfshard.errors import (
    BadRequest,
)

_MISSING: Any = object()


class _Invalid(Exception):
    """A value failed validation; ``path`` is filled in while unwinding so
    the success path never pays for building field names."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.path: list[str] = []


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_TYPE_NAMES = {
    str: "str",
    bytes: "bytes",
    int: "int",
    float: "float",
    bool: "bool",
    list: "list",
    dict: "map",
    type(None): "null",
}
_WIRE_TYPES = frozenset(_TYPE_NAMES)
_SIZED = frozenset({str, bytes, list, dict})


class Value:
    """Constraints on one wire value.

    ``type_`` is one of str, bytes, int, float, bool, list, dict (or a tuple
    of them).  Matching is exact: True is not an int, and an int is accepted
    for float (CBOR encoders may shorten 2.0 to 2).  ``min``/``max`` bound
    numbers; ``min_len``/``max_len`` bound len() of str, bytes, list and map;
    ``max_bytes`` bounds the UTF-8 size of a str (or the size of bytes).
    ``items`` validates each list element; ``fields`` gives a nested map a
    schema (no unknown keys); ``keys``/``values`` validate a free-form map.
    ``check`` is called last with the value and may raise BadRequest (or
    ValueError) to refuse it.
    """

    __slots__ = (
        "check",
        "fields",
        "items",
        "keys",
        "max",
        "max_bytes",
        "max_len",
        "min",
        "min_len",
        "nullable",
        "type_name",
        "types",
        "values",
        "_type_and_length_only",
    )

    def __init__(
        self,
        type_: type | tuple[type, ...],
        *,
        nullable: bool = False,
        min: float | None = None,
        max: float | None = None,
        min_len: int | None = None,
        max_len: int | None = None,
        max_bytes: int | None = None,
        items: Value | None = None,
        fields: Sequence[Arg] | None = None,
        keys: Value | None = None,
        values: Value | None = None,
        check: Callable[[Any], object] | None = None,
    ) -> None:
        types = type_ if isinstance(type_, tuple) else (type_,)
        for t in types:
            if t not in _WIRE_TYPES:
                raise TypeError(f"{t!r} is not a wire type")
        accepted = set(types)
        if float in accepted:
            accepted.add(int)
        if nullable:
            accepted.add(type(None))
        self.types = frozenset(accepted)
        self.type_name = " or ".join(_TYPE_NAMES[t] for t in types) + (" or null" if nullable else "")
        self.nullable = nullable
        self.min = min
        self.max = max
        self.min_len = min_len
        self.max_len = max_len
        self.max_bytes = max_bytes
        self.items = items
        self.fields = Schema(fields) if fields is not None else None
        self.keys = keys
        self.values = values
        self.check = check
        self._type_and_length_only = all(
            c is None for c in (min, max, min_len, max_bytes, items, fields, keys, values, check)
        )
        if (min is not None or max is not None) and not accepted <= {int, float, type(None)}:
            raise TypeError("min= and max= only apply to numbers")
        if (items is not None) and list not in types:
            raise TypeError("items= only applies to lists")
        if (fields is not None or keys is not None or values is not None) and dict not in types:
            raise TypeError("fields=, keys= and values= only apply to maps")

    def validate(self, value: Any) -> Any:
        """Return the value (nested maps with a schema come back validated),
        or raise _Invalid."""
        kind = type(value)
        if kind not in self.types:
            raise _Invalid(f"expected {self.type_name}, got {_TYPE_NAMES.get(kind, kind.__name__)}")
        if self._type_and_length_only:
            # The common case (a type and at most a length) in a few steps:
            # this runs for every argument of every request.
            if self.max_len is not None and kind in _SIZED and len(value) > self.max_len:
                raise _Invalid(f"length {len(value)} exceeds {self.max_len}")
            return value
        if value is None:
            return None
        if kind is float and value != value and (self.min is not None or self.max is not None):
            raise _Invalid("must be a number, got NaN")
        if self.min is not None and value < self.min:
            raise _Invalid(f"must be >= {self.min}, got {_short_repr(value)}")
        if self.max is not None and value > self.max:
            raise _Invalid(f"must be <= {self.max}, got {_short_repr(value)}")
        if kind is str or kind is bytes or kind is list or kind is dict:
            size = len(value)
            if self.max_len is not None and size > self.max_len:
                raise _Invalid(f"length {size} exceeds {self.max_len}")
            if self.min_len is not None and size < self.min_len:
                raise _Invalid(f"length {size} is below {self.min_len}")
            if self.max_bytes is not None:
                # A str of n chars is at most 4n UTF-8 bytes: encode only when
                # that bound is not already enough.
                if kind is str and size * 4 > self.max_bytes:
                    size = len(value.encode("utf-8", "surrogatepass"))
                if size > self.max_bytes:
                    raise _Invalid(f"size {size} bytes exceeds {self.max_bytes}")
            if kind is list and self.items is not None:
                validate_item = self.items.validate
                for index, item in enumerate(value):
                    try:
                        validate_item(item)
                    except _Invalid as e:
                        e.path.append(f"[{index}]")
                        raise
            elif kind is dict:
                if self.fields is not None:
                    value = self.fields.validate(value)
                if self.keys is not None or self.values is not None:
                    for key, item in value.items():
                        try:
                            if self.keys is not None:
                                self.keys.validate(key)
                        except _Invalid as e:
                            e.path.append(f"[key {_short_repr(key, 30)}]")
                            raise
                        try:
                            if self.values is not None:
                                self.values.validate(item)
                        except _Invalid as e:
                            e.path.append(f"[{_short_repr(key, 30)}]")
                            raise
        if self.check is not None:
            try:
                self.check(value)
            except BadRequest as e:
                raise _Invalid(e.message) from None
            except ValueError as e:
                raise _Invalid(str(e) or "invalid value") from None
        return value


class Arg:
    """One named argument: ``Arg("name", str, max_bytes=4096)``.

    The second argument is a type (constraints as keywords, see ``Value``)
    or a ready ``Value``.  An argument with a ``default`` is optional and the
    handler gets the default when it is absent (use immutable defaults); an
    argument with ``required=False`` and no default is simply not passed.
    """

    __slots__ = ("default", "name", "required", "value")

    def __init__(
        self,
        name: str,
        type_or_value: type | tuple[type, ...] | Value,
        *,
        required: bool = True,
        default: Any = _MISSING,
        **constraints: Any,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError("an argument name must be a non-empty str")
        if isinstance(type_or_value, Value):
            if constraints:
                raise TypeError("pass constraints to Value(...) or to Arg(...), not both")
            self.value = type_or_value
        else:
            self.value = Value(type_or_value, **constraints)
        self.name = name
        self.default = default
        self.required = required and default is _MISSING

    def __repr__(self) -> str:
        return f"Arg({self.name!r}, {self.value.type_name}{'' if self.required else ', optional'})"


class Schema:
    """The arguments of one method (or the fields of a nested map).

    ``validate`` first runs a function generated for this schema (see
    ``_SchemaCompiler``): every check of every argument inlined, no call
    per value.  It only answers "valid, here are the arguments" or "not
    valid"; for the latter the generic validator below runs again to say
    exactly what is wrong (which argument, which rule), so refusals are
    described as before and only the success path is fast.
    """

    __slots__ = ("_args", "_fast", "_names")

    def __init__(self, args: Iterable[Arg] = ()) -> None:
        self._args = tuple(args)
        names = [a.name for a in self._args]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate argument names in {names}")
        self._names = frozenset(names)
        self._fast: Callable[[Any], dict[str, Any] | None] = _SchemaCompiler().compile(self)

    @property
    def args(self) -> tuple[Arg, ...]:
        return self._args

    def validate(self, args: Any) -> dict[str, Any]:
        """Return the validated arguments, defaults filled in; raise _Invalid."""
        out = self._fast(args)
        if out is not None:
            return out
        return self.validate_generic(args)

    def validate_generic(self, args: Any) -> dict[str, Any]:
        """``validate`` by walking the schema: slower, and it names what is
        wrong.  (Also the reference the generated validator is tested against.)"""
        if type(args) is not dict:
            raise _Invalid(f"expected a map, got {_TYPE_NAMES.get(type(args), type(args).__name__)}")
        if not self._names.issuperset(args):
            unknown = sorted(_short_repr(k, 40) for k in args if k not in self._names)
            more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
            raise _Invalid(f"unknown field(s) {', '.join(unknown[:5])}{more}")
        out: dict[str, Any] = {}
        for arg in self._args:
            value = args.get(arg.name, _MISSING)
            if value is _MISSING:
                if arg.required:
                    error = _Invalid("is required")
                    error.path.append(arg.name)
                    raise error
                if arg.default is not _MISSING:
                    out[arg.name] = arg.default
                continue
            try:
                out[arg.name] = arg.value.validate(value)
            except _Invalid as e:
                e.path.append(arg.name)
                raise
        return out

    def check(self, args: Any, where: str = "args") -> dict[str, Any]:
        """Validate, turning a failure into BadRequest naming the field."""
        try:
            return self.validate(args)
        except _Invalid as e:
            raise BadRequest(_describe(where, e)) from None


def _replaces(value: Value) -> bool:
    """Whether validating ``value`` can give back a new object (a nested map
    with a schema is replaced by its validated copy)."""
    return value.fields is not None


class _SchemaCompiler:
    """Writes the source of one function that validates a Schema.

    The function returns the validated arguments (the same dict the generic
    validator returns) or None for anything the generic validator would
    refuse; it may refuse more (the generic one then decides), never less.
    Constants (types, bounds, defaults, check callables, nested schemas) are
    passed in the function's globals, never written into the source, so no
    value is ever turned into code.  Argument names appear only as string
    literals (repr).
    """

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.namespace: dict[str, Any] = {
            "_MISSING": _MISSING,
            "_CHECK_ERRORS": (BadRequest, ValueError),
        }
        self._names = 0

    def name(self, prefix: str) -> str:
        self._names += 1
        return f"{prefix}{self._names}"

    def const(self, value: Any) -> str:
        name = self.name("c")
        self.namespace[name] = value
        return name

    def emit(self, depth: int, line: str) -> None:
        self.lines.append("    " * depth + line)

    def compile(self, schema: Schema) -> Callable[[Any], dict[str, Any] | None]:
        # With no defaults to fill in and no nested map to replace by its
        # validated copy, the validated arguments are the arguments: the
        # function returns the dict it was given (callers get their own
        # copy anyway when it is spread into a handler's keywords).
        copies = any(arg.default is not _MISSING or _replaces(arg.value) for arg in schema.args)
        self.emit(0, "def validate(args):")
        self.emit(1, f"if type(args) is not dict or not {self.const(schema._names.issuperset)}(args):")
        self.emit(2, "return None")
        if copies:
            self.emit(1, "out = {}")
        if any(not arg.required for arg in schema.args):
            self.emit(1, "get = args.get")
        for arg in schema.args:
            key = repr(arg.name)
            var = self.name("v")
            if arg.required:
                self.emit(1, "try:")
                self.emit(2, f"{var} = args[{key}]")
                self.emit(1, "except KeyError:")
                self.emit(2, "return None")
                self.value(arg.value, var, 1)
                if copies:
                    self.emit(1, f"out[{key}] = {var}")
                continue
            self.emit(1, f"{var} = get({key}, _MISSING)")
            if arg.default is not _MISSING:
                self.emit(1, f"if {var} is _MISSING:")
                self.emit(2, f"out[{key}] = {self.const(arg.default)}")
                self.emit(1, "else:")
            else:
                self.emit(1, f"if {var} is not _MISSING:")
            mark = len(self.lines)
            self.value(arg.value, var, 2)
            if copies:
                self.emit(2, f"out[{key}] = {var}")
            elif len(self.lines) == mark:
                self.emit(2, "pass")
        self.emit(1, "return out" if copies else "return args")
        exec("\n".join(self.lines), self.namespace)  # the source is built above from no input
        return self.namespace["validate"]  # type: ignore[no-any-return]

    def value(self, value: Value, var: str, depth: int) -> None:
        """Checks of one value held in ``var``; a refusal returns None."""
        types = value.types
        concrete = types - {type(None)}
        if len(concrete) > 1:
            self.mixed_value(value, var, depth)
            return
        (kind,) = concrete
        refuse = self.number_tests(value, var) + self.size_tests(value, var, kind)
        test = f"type({var}) is not {self.const(kind)}"
        if len(types) == 1:
            # One line for the common case: "type wrong or any bound broken".
            self.emit(depth, f"if {' or '.join([test, *refuse])}:")
            self.emit(depth + 1, "return None")
            inner = depth
        else:  # nullable: the generic validator checks nothing more of a null
            self.emit(depth, f"if {var} is not None:")
            self.emit(depth + 1, f"if {' or '.join([test, *refuse])}:")
            self.emit(depth + 2, "return None")
            inner = depth + 1
        self.contents(value, var, f"type({var})", inner)
        self.check(value, var, inner)

    def mixed_value(self, value: Value, var: str, depth: int) -> None:
        """A value of one of several types: the bounds that apply depend on
        which type it has."""
        kind = self.name("t")
        self.emit(depth, f"{kind} = type({var})")
        self.emit(depth, f"if {kind} not in {self.const(value.types)}:")
        self.emit(depth + 1, "return None")
        inner = depth
        if type(None) in value.types:
            self.emit(depth, f"if {var} is not None:")
            inner = depth + 1
        mark = len(self.lines)
        numbers = self.number_tests(value, var)
        if numbers:
            self.emit(inner, f"if {' or '.join(numbers)}:")
            self.emit(inner + 1, "return None")
        for sized in sorted(value.types & _SIZED, key=lambda t: t.__name__):
            sizes = self.size_tests(value, var, sized)
            if sizes:
                self.emit(inner, f"if {kind} is {self.const(sized)} and ({' or '.join(sizes)}):")
                self.emit(inner + 1, "return None")
        self.contents(value, var, kind, inner)
        self.check(value, var, inner)
        if len(self.lines) == mark and inner != depth:
            self.emit(inner, "pass")

    def check(self, value: Value, var: str, depth: int) -> None:
        if value.check is not None:
            self.emit(depth, "try:")
            self.emit(depth + 1, f"{self.const(value.check)}({var})")
            self.emit(depth, "except _CHECK_ERRORS:")
            self.emit(depth + 1, "return None")

    def number_tests(self, value: Value, var: str) -> list[str]:
        """Conditions that refuse a number.  "not (v >= lo)" rather than
        "v < lo": NaN fails it, as it must."""
        tests = []
        if value.min is not None:
            tests.append(f"not ({var} >= {self.const(value.min)})")
        if value.max is not None:
            tests.append(f"not ({var} <= {self.const(value.max)})")
        return tests

    def size_tests(self, value: Value, var: str, kind: type) -> list[str]:
        """Conditions that refuse a value of type ``kind`` for its size."""
        if kind not in _SIZED:
            return []
        tests = []
        if value.max_len is not None:
            tests.append(f"len({var}) > {self.const(value.max_len)}")
        if value.min_len is not None:
            tests.append(f"len({var}) < {self.const(value.min_len)}")
        if value.max_bytes is not None:
            limit = self.const(value.max_bytes)
            if kind is str:
                # A str of n chars is at most 4n UTF-8 bytes: encode only
                # when that bound is not already enough (as the generic one).
                tests.append(
                    f"(len({var}) * 4 > {limit} and len({var}.encode('utf-8', 'surrogatepass')) > {limit})"
                )
            else:
                tests.append(f"len({var}) > {limit}")
        return tests

    def contents(self, value: Value, var: str, kind: str, depth: int) -> None:
        if value.items is not None:
            loop = depth
            if len(value.types - {type(None)}) > 1:
                self.emit(depth, f"if {kind} is list:")
                loop = depth + 1
            item = self.name("i")
            self.emit(loop, f"for {item} in {var}:")
            self.value(value.items, item, loop + 1)
        if value.fields is None and value.keys is None and value.values is None:
            return
        if len(value.types - {type(None)}) > 1:
            self.emit(depth, f"if {kind} is dict:")
            depth += 1
        if value.fields is not None:
            # The nested map is replaced by its validated copy, as the
            # generic validator does.
            self.emit(depth, f"{var} = {self.const(value.fields._fast)}({var})")
            self.emit(depth, f"if {var} is None:")
            self.emit(depth + 1, "return None")
        if value.keys is not None or value.values is not None:
            key, item = self.name("k"), self.name("i")
            self.emit(depth, f"for {key}, {item} in {var}.items():")
            if value.keys is not None:
                self.value(value.keys, key, depth + 1)
            if value.values is not None:
                self.value(value.values, item, depth + 1)
            else:
                self.emit(depth + 1, "pass")


def _describe(where: str, error: _Invalid) -> str:
    path = where
    for part in reversed(error.path):
        path += part if part.startswith("[") else f".{part}"
    return f"{path}: {error.message}"
