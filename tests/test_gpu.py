"""The cuda backend on a real GPU: the example zoo against fp64.

Skipped without a CUDA GPU (CI has none); run on the GPU machine with `python -m pytest -m gpu`.
"""

from __future__ import annotations

import pytest
import torch

import flagtree
from examples.zoo import ZOO
from tests.frontend_helpers import assert_matches_fp64, fp64_twin

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# bf16 CNN: BatchNorm in bf16 drifts beyond the bf16 tolerance in eager torch as well.
CASES = [(name, dtype) for name in ZOO for dtype in (torch.float32, torch.bfloat16)
         if (name, dtype) != ("cnn", torch.bfloat16)]


def _fp64_outputs(name: str, model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    twin, twin_inputs = fp64_twin(model, inputs)
    with torch.no_grad():
        return twin(*twin_inputs)


@pytest.mark.parametrize("name,dtype", CASES, ids=[f"{n}-{str(d)[6:]}" for n, d in CASES])
def test_zoo_on_cuda_matches_fp64(name, dtype):
    torch._dynamo.reset()
    flagtree.clear_reports()
    model, inputs = ZOO[name](dtype=dtype, device="cuda")
    compiled = torch.compile(model, backend="flagtree")
    with torch.no_grad():
        actual = compiled(*inputs)
    assert_matches_fp64(actual, _fp64_outputs(name, model, inputs), dtype, name)
    assert {r.backend for r in flagtree.reports()} == {"cuda"}

