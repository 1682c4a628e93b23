"""The launch plan: a compiled graph as one readable Python function.

A codegen backend does not interpret FTIR at run time; it writes the source of a
function `run(arg0, arg1, ...)` whose lines are kernel launches, library calls and
buffer allocations, like Inductor's output code:

    buf3 = torch.empty((s0, 64), dtype=torch.float32, device=device)
    fused_exp_add[(triton.cdiv(s0 * 64, 1024),)](arg0, buf3, s0, BLOCK=1024)
    buf4 = torch.matmul(buf3, arg1)
    del buf3
    return [buf4]

`PlanWriter` collects those lines and the objects they name (kernels, reference ops,
constants); `LaunchPlan` compiles the source once and is the backend's executable.
Its `source` is what `flagtree-opt --emit=python` prints.
"""

from __future__ import annotations

import itertools
import linecache
import re
from collections import Counter
from typing import Any

import torch

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_plan_ids = itertools.count()


class PlanWriter:
    """Builds the source of one launch plan, line by line."""

    def __init__(self, backend: str, num_args: int, function: str = "main"):
        self.backend = backend
        self.function = function
        self.num_args = num_args
        self._lines: list[str] = []
        self._notes: list[str] = []
        self._globals: dict[str, Any] = {}
        self._counters: Counter[str] = Counter()
        self._sizes: dict[str, str] = {}
        self.fallback_ops: Counter[str] = Counter()

    def arg(self, index: int) -> str:
        """The name of the plan function's parameter `index`."""
        if not 0 <= index < self.num_args:
            raise IndexError(f"the plan of @{self.function} has {self.num_args} arguments, not {index + 1}")
        return f"arg{index}"

    def new_buffer(self, prefix: str = "buf") -> str:
        """A fresh local name: buf0, buf1, ... (one counter per prefix)."""
        name = f"{prefix}{self._counters[prefix]}"
        self._counters[prefix] += 1
        return name

    def line(self, text: str) -> None:
        """Append one statement to the body of `run`."""
        self._lines.append(text)

    def comment(self, text: str) -> None:
        """Append a comment line to the body of `run`."""
        self._lines.append("# " + _one_line(text))

    def note(self, text: str) -> None:
        """Add a line to the header comment (a kernel's source file and cache key, ...)."""
        self._notes.append(_one_line(text))

    def bind(self, name: str, obj: Any) -> str:
        """Make `obj` a global of the plan; returns the name the source must use.

        Binding the same object twice returns the first name; another object that
        asks for a taken name gets a numbered one (`ft_softmax_1`).
        """
        if not _IDENTIFIER.fullmatch(name):
            raise ValueError(f"'{name}' is not a Python identifier")
        for suffix in itertools.count():
            candidate = name if suffix == 0 else f"{name}_{suffix}"
            if candidate not in self._globals:
                self._globals[candidate] = obj
                return candidate
            if self._globals[candidate] is obj:
                return candidate
        raise AssertionError("unreachable")

    def size(self, expr: str) -> str:
        """A local holding the run-time size `expr` (`arg0.shape[1]`), computed once."""
        if expr.isdigit() or _IDENTIFIER.fullmatch(expr):
            return expr
        if expr not in self._sizes:
            name = self.new_buffer("s")
            self._sizes[expr] = name
            self.line(f"{name} = {expr}")
        return self._sizes[expr]

    def build(self, outputs: list[str]) -> LaunchPlan:
        """The finished plan, returning `outputs` (names or literals) as a list."""
        params = ", ".join(f"arg{i}" for i in range(self.num_args))
        header = [f"# flagtree launch plan for @{self.function} (backend: {self.backend})"]
        header += [f"#   {note}" for note in self._notes]
        if self.fallback_ops:
            counted = ", ".join(f"{name} x{n}" for name, n in sorted(self.fallback_ops.items()))
            header.append(f"#   eager fallbacks: {_one_line(counted)}")
        body = [*self._lines, f"return [{', '.join(outputs)}]"]
        source = "\n".join([*header, f"def run({params}):", *("    " + line for line in body)]) + "\n"
        return LaunchPlan(source, dict(self._globals), self.backend, Counter(self.fallback_ops))


def _one_line(text: str) -> str:
    """`text` with line breaks and other control characters escaped (`\\n`, `\\x00`), so it
    stays one comment line of valid source."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class LaunchPlan:
    """An executable graph: call it with the graph's inputs, get its outputs as a list.

    source: the Python text of the plan (what `--emit=python` prints).
    globals: the objects the source names (kernels, reference ops, constants).
    backend: the backend that generated it.
    fallback_ops: ops that run through eager torch instead of generated code, counted.
    """

    def __init__(self, source: str, globals: dict[str, Any], backend: str, fallback_ops: Counter[str] | None = None):
        self.source = source
        self.globals = globals
        self.backend = backend
        self.fallback_ops = fallback_ops or Counter()
        self._run = None

    def _compile(self):
        # A unique pseudo-file registered with linecache, so tracebacks show plan lines.
        filename = f"<flagtree-plan-{next(_plan_ids)}-{self.backend}>"
        linecache.cache[filename] = (len(self.source), None, self.source.splitlines(True), filename)
        namespace = dict(self.globals)
        exec(compile(self.source, filename, "exec"), namespace)
        return namespace["run"]

    def __call__(self, *args: Any) -> list[Any]:
        if self._run is None:
            self._run = self._compile()
        return self._run(*args)


class DeviceConstant:
    """A constant tensor of the graph, copied to each device it is used on once."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor
        self._copies: dict[torch.device, torch.Tensor] = {}

    def on(self, device: torch.device) -> torch.Tensor:
        if device not in self._copies:
            self._copies[device] = self.tensor.to(device)
        return self._copies[device]
