"""flagtree: an AI compiler frontend and torch.compile backend.

`passes/` and `backends/` live at the top of the repository but install as
`flagtree.passes` and `flagtree.backends`, so no stray top-level names reach site-packages.
"""

from setuptools import find_packages, setup


def _mapped(folder: str, package: str) -> list[str]:
    return [package] + [f"{package}.{p}" for p in find_packages(folder)]


setup(
    name="flagtree",
    version="0.1.0",
    description="torch.compile backend and AI compiler frontend for frontier models on many accelerators",
    python_requires=">=3.10",
    packages=find_packages(include=["flagtree", "flagtree.*"])
    + _mapped("passes", "flagtree.passes")
    + _mapped("backends", "flagtree.backends"),
    package_dir={"flagtree.passes": "passes", "flagtree.backends": "backends"},
    package_data={"flagtree.ir": ["*.lark"], "flagtree.passes": ["*.lark"]},
    install_requires=["torch>=2.11", "triton>=3.6", "lark>=1.2", "numpy"],
    extras_require={
        # MLIR's Python bindings; only the cpu backend and MLIR-based tests need them.
        "mlir": ["torch-mlir"],
        "test": ["pytest", "hypothesis", "lit", "filecheck", "ruff"],
    },
    entry_points={
        "torch_dynamo_backends": ["flagtree = flagtree.frontend.backend:flagtree_backend"],
        "flagtree.backends": [
            "reference = flagtree.backends.reference:ReferenceBackend",
            "cpu = flagtree.backends.cpu:CpuBackend",
            "cuda = flagtree.backends.cuda:CudaBackend",
            "rocm = flagtree.backends.rocm:RocmBackend",
            "interpret = flagtree.backends.interpret:InterpretBackend",
        ],
        "console_scripts": [
            "flagtree-opt = flagtree.cli.opt:main",
            "flagtree = flagtree.cli.main:main",
        ],
    },
)
