"""Compile Triton kernels for a real GPU target (sm_90) on a machine without a GPU."""

from __future__ import annotations

from typing import Any


class CompileForSm90:
    """Stands in for a JITFunction: on launch, compiles for sm_90 exactly as triton.jit would
    (same argument specialisation) and appends the result to `compiled` instead of running."""

    compiled: list[Any] = []  # shared by every instance: a test clears it, launches, then reads it

    def __init__(self, function: Any, do_not_specialize: list[str]):
        from triton.runtime.jit import JITFunction

        self.jit = JITFunction(function, do_not_specialize=do_not_specialize)

    def __getitem__(self, grid: Any) -> Any:
        def launch(*args: Any, **kwargs: Any) -> None:
            import triton
            from triton.backends.compiler import GPUTarget
            from triton.compiler import ASTSource, make_backend
            from triton.runtime.jit import create_function_from_signature

            target = GPUTarget("cuda", 90, 32)
            backend = make_backend(target)
            binder = create_function_from_signature(self.jit.signature, self.jit.params, backend)
            bound, specialization, options = binder(*args, **kwargs)
            options, signature, constexprs, attrs = self.jit._pack_args(backend, kwargs, bound, specialization,
                                                                        options)
            source = ASTSource(self.jit, signature, constexprs, attrs)
            self.compiled.append(triton.compile(source, target=target, options=options.__dict__))

        return launch
