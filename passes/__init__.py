"""flagtree's passes and the pass manager (installed as `flagtree.passes`).

Importing this package registers every pass; pipelines name them (`canonicalize,cse`).
"""

from flagtree.passes import (  # noqa: F401  (they register themselves)
    canonicalize,
    cse,
    dce,
    fold,
    fuse_attention,
    fuse_elementwise,
    fuse_gather_matmul,
    legalize_dtypes,
)
from flagtree.passes.base import Pass, all_passes, get_pass, register_pass
from flagtree.passes.manager import IRPrinting, PassManager, PipelineResult
from flagtree.passes.pipeline import parse_pipeline, preset_pipeline

__all__ = [
    "IRPrinting", "Pass", "PassManager", "PipelineResult", "all_passes", "get_pass", "parse_pipeline",
    "preset_pipeline", "register_pass",
]
