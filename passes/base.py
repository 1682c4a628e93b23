"""The `Pass` base class, pass options, and the pass registry.

Modelled on xDSL's `ModulePass`: a pass is a small frozen dataclass.  Its class-level
`name` is how pipelines spell it (`canonicalize`), and its fields are its options, typed
and with defaults.  Pipeline text writes option names with dashes (`max-iterations`); the
fields use underscores (`max_iterations`).

    @register_pass
    @dataclass(frozen=True)
    class Canonicalize(Pass):
        '''Simplify ops to their canonical forms.'''

        name: ClassVar[str] = "canonicalize"
        max_iterations: int = 10

        def run(self, module: Module) -> bool: ...

Option types: `int`, `float`, `bool`, `str`, and lists of those as `tuple[int, ...]`
(tuples, because the dataclass is frozen and hashable).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass
from typing import Any, ClassVar

from flagtree.errors import OptionsError
from flagtree.ir.core import Module

# A pass or option name as pipeline text writes it.
_PIPELINE_NAME = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")
# Option type → (how messages name one value, how they name a list's elements).
_SCALAR_OPTION_TYPES: dict[type, tuple[str, str]] = {
    bool: ("true or false", "bools"), int: ("an integer", "integers"), float: ("a number", "numbers"),
    str: ("a string", "strings"),
}
# Strings that print without quotes: they lex as a bare word, not as a number, bool, inf or nan.
_BARE_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
_RESERVED_WORDS = frozenset({"true", "false", "inf", "nan"})


@dataclass(frozen=True)
class OptionSpec:
    """One pass option: its pipeline-text name, dataclass field, type and default."""

    text_name: str
    field_name: str
    type: Any
    default: Any

    def describe_type(self) -> str:
        if self.type in _SCALAR_OPTION_TYPES:
            return _SCALAR_OPTION_TYPES[self.type][0]
        return f"a list of {_SCALAR_OPTION_TYPES[typing.get_args(self.type)[0]][1]}"


@dataclass(frozen=True)
class Pass:
    """A transformation of a whole module; subclasses set `name` and implement `run`."""

    name: ClassVar[str] = ""

    def run(self, module: Module) -> bool:
        """Transform `module` in place; return True if the IR changed."""
        raise NotImplementedError(f"pass '{self.name}' does not implement run()")

    @classmethod
    def options(cls) -> dict[str, OptionSpec]:
        """The pass's options keyed by their pipeline-text (dashed) names."""
        hints = typing.get_type_hints(cls)
        specs = {}
        for f in dataclasses.fields(cls):
            text_name = f.name.replace("_", "-")
            specs[text_name] = OptionSpec(text_name, f.name, hints[f.name], f.default)
        return specs

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> Pass:
        """Build the pass from parsed `{dashed-name: value}` options, checking names and types."""
        return cls(**dict(cls.check_option(name, value) for name, value in options.items()))

    @classmethod
    def check_option(cls, text_name: str, value: Any) -> tuple[str, Any]:
        """(field name, value as the field's type) for one option; raises OptionsError when the
        pass has no such option or the value has the wrong type."""
        specs = cls.options()
        spec = specs.get(text_name)
        if spec is None:
            raise OptionsError(f"pass '{cls.name}' has no option '{text_name}'{_suggest(text_name, specs)}; "
                               f"{_describe_options(cls.name, specs)}")
        return spec.field_name, _coerce(value, spec, cls.name)

    @classmethod
    def describe(cls) -> str:
        """One line for pass listings: the pass with its default options, and its summary."""
        lines = (cls.__doc__ or "").strip().splitlines()
        return f"{cls().pipeline_text()}: {lines[0] if lines else ''}"

    def pipeline_text(self) -> str:
        """This pass as pipeline text, every option spelled out: `canonicalize{max-iterations=10}`."""
        values = [f"{spec.text_name}={format_option_value(getattr(self, spec.field_name))}"
                  for spec in self.options().values()]
        return self.name + ("{" + " ".join(values) + "}" if values else "")


def format_option_value(value: Any) -> str:
    """The pipeline-text spelling of an option value; `parse_pipeline` reads it back unchanged."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_option_value(v) for v in value) + "]"
    if _BARE_WORD.fullmatch(value) and value not in _RESERVED_WORDS:
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _coerce(value: Any, spec: OptionSpec, pass_name: str) -> Any:
    """`value` as the option's type (an int is a valid float; a list becomes a tuple)."""
    try:
        if typing.get_origin(spec.type) is tuple:
            if not isinstance(value, (list, tuple)):
                raise TypeError(spec.type)
            element = typing.get_args(spec.type)[0]
            return tuple(_coerce_scalar(v, element) for v in value)
        return _coerce_scalar(value, spec.type)
    except TypeError:
        raise OptionsError(f"pass '{pass_name}': option '{spec.text_name}' expects {spec.describe_type()}, "
                           f"got {format_option_value(value)}") from None


def _coerce_scalar(value: Any, expected: type) -> Any:
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, expected) and not (isinstance(value, bool) and expected is not bool):
        return value
    raise TypeError(expected)


def _describe_options(pass_name: str, specs: dict[str, OptionSpec]) -> str:
    if not specs:
        return f"'{pass_name}' takes no options"
    listed = ", ".join(f"{s.text_name} ({s.describe_type()}, default {format_option_value(s.default)})"
                       for s in specs.values())
    return f"valid options: {listed}"


def _suggest(name: str, candidates: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


_PASSES: dict[str, type[Pass]] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make `cls` available to pipelines under `cls.name`."""
    # Checked on the class itself: a plain subclass inherits its base's dataclass attributes.
    if "__dataclass_params__" not in cls.__dict__ or not cls.__dataclass_params__.frozen:
        raise TypeError(f"pass class {cls.__name__} must be a frozen dataclass (@dataclass(frozen=True))")
    if not _PIPELINE_NAME.fullmatch(cls.name):
        raise ValueError(f"pass class {cls.__name__} has name {cls.name!r}; use lower-case words joined by dashes")
    if cls.name in _PASSES and _PASSES[cls.name] is not cls:
        raise ValueError(f"two passes are named '{cls.name}': {_PASSES[cls.name].__qualname__} and {cls.__qualname__}")
    for spec in cls.options().values():
        _check_option_declaration(cls, spec)
    _PASSES[cls.name] = cls
    return cls


def _check_option_declaration(cls: type[Pass], spec: OptionSpec) -> None:
    element = typing.get_args(spec.type)[0] if typing.get_origin(spec.type) is tuple else spec.type
    if element not in _SCALAR_OPTION_TYPES:
        raise TypeError(f"pass '{cls.name}': option field '{spec.field_name}' has type {spec.type}; "
                        f"options are int, float, bool, str or tuple[<one of those>, ...]")
    if spec.default is dataclasses.MISSING:
        raise TypeError(f"pass '{cls.name}': option field '{spec.field_name}' needs a default value")


def get_pass(name: str) -> type[Pass]:
    """The pass class registered as `name`; raises OptionsError listing the valid names."""
    try:
        return _PASSES[name]
    except KeyError:
        raise OptionsError(f"unknown pass '{name}'{_suggest(name, _PASSES)}; "
                           f"valid passes: {', '.join(sorted(_PASSES))}") from None


def all_passes() -> dict[str, type[Pass]]:
    """Every registered pass class, keyed by name, in name order."""
    return dict(sorted(_PASSES.items()))
