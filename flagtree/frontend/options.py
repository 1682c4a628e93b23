"""Compile options: what `torch.compile(..., backend="flagtree", options={...})` accepts, and
which `mode=` values flagtree runs (`check_mode`)."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flagtree.backends.registry import all_backends
from flagtree.errors import OptionsError

DUMP_DIR_ENV = "FLAGTREE_DUMP_DIR"
BACKEND_ENV = "FLAGTREE_BACKEND"
REDUCE_OVERHEAD = "reduce-overhead"
MODES = (None, "default", REDUCE_OVERHEAD)
# What to use instead of Inductor's autotuning modes: flagtree tunes its kernels the same way in every mode.
_AUTOTUNE_MODES = {
    "max-autotune": "mode='reduce-overhead' gives the CUDA graphs it also records",
    "max-autotune-no-cudagraphs": "leave mode unset, which is the same thing here",
}


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


@dataclass(frozen=True)
class CompileOptions:
    """Options for compiling one model with flagtree.

    Fields:
      opt_level: 0-3; picks the preset pass pipeline (`flagtree.passes.preset_pipeline`).
      pipeline: a pipeline string (`canonicalize,cse`) that replaces the preset.
      freeze: inference only: bake nn.Parameters into the graph as constants, so passes can
        fold them and the compiled graph no longer takes them as arguments. Like Inductor's
        freezing, the parameters are captured at compile time: changing them afterwards is
        not seen by the compiled graph (call `torch._dynamo.reset()` and compile again).
      dump_dir: write every stage of each graph's compile under this folder
        (default: the FLAGTREE_DUMP_DIR environment variable).
      verify_each: run the FTIR verifier after every pass.
      target: the backend that runs the graphs (default: FLAGTREE_BACKEND, else the
        highest-priority available backend for the inputs' device; `flagtree backends` lists them).
    """

    opt_level: int = 2
    pipeline: str | None = None
    freeze: bool = False
    dump_dir: str | None = field(default_factory=lambda: _env(DUMP_DIR_ENV))
    verify_each: bool = True
    target: str | None = field(default_factory=lambda: _env(BACKEND_ENV))

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), _FIELD_TYPES[f.name])
        if not 0 <= self.opt_level <= 3:
            raise OptionsError(f"option 'opt_level' must be 0, 1, 2 or 3, not {self.opt_level}")
        if self.target is not None:
            known = all_backends()
            if self.target not in known:
                raise OptionsError(
                    f"unknown target '{self.target}' (from option 'target' or ${BACKEND_ENV}); "
                    f"valid targets: {', '.join(known)}"
                )

    @classmethod
    def from_dict(cls, options: Mapping[str, Any] | None) -> CompileOptions:
        """Options from `torch.compile`'s `options=` dict; unknown keys and wrong types are OptionsErrors."""
        options = dict(options or {})
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise OptionsError(
                f"unknown flagtree option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                f"valid options: {', '.join(valid)}"
            )
        return cls(**options)


_FIELD_TYPES = typing.get_type_hints(CompileOptions)


def _check_type(name: str, value: Any, expected: Any) -> None:
    allowed = typing.get_args(expected) if isinstance(expected, types.UnionType) else (expected,)
    for kind in allowed:
        if kind is type(None) and value is None:
            return
        # bool is an int in Python; `opt_level=True` is still a mistake.
        if kind is not type(None) and isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
            return
    names = " or ".join("None" if k is type(None) else k.__name__ for k in allowed)
    raise OptionsError(f"option '{name}' must be {names}, not {type(value).__name__} {value!r}")


def check_mode(mode: str | None) -> None:
    """torch.compile's `mode=`: None or "default", or "reduce-overhead", which records the
    graphs the cuda backend runs into CUDA graphs (on other devices and backends they run
    as usual, and each graph's report notes why).

    The max-autotune modes are refused rather than run as another mode: flagtree tunes its
    kernels the same way in every mode, so it would silently not do what the name promises.
    """
    if mode in MODES:
        return
    instead = _AUTOTUNE_MODES.get(mode)
    why = f" (flagtree tunes its kernels the same way in every mode: {instead})" if instead else ""
    raise OptionsError(
        f"mode '{mode}' is not supported by flagtree{why}; valid modes: default, "
        f"{REDUCE_OVERHEAD} (CUDA graphs on cuda)"
    )
