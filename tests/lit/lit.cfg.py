# lit configuration of flagtree's FileCheck regression suite: `lit -sv tests/lit`.
#
# The tools run under the Python that runs lit, so the suite works in any venv where
# flagtree is installed, whether or not that venv's bin/ is on PATH.

import os
import sys

import lit.formats

config.name = "flagtree"  # noqa: F821 (lit injects `config`)
config.test_format = lit.formats.ShTest(execute_external=False)  # noqa: F821
config.suffixes = [".ftir"]  # noqa: F821
config.test_source_root = os.path.dirname(__file__)  # noqa: F821
config.test_exec_root = os.path.join(config.test_source_root, "Output")  # noqa: F821
# Output/ holds the tests' own .ftir files; Inputs/ holds files tests read, not tests.
config.excludes = ["Output", "Inputs"]  # noqa: F821


def _tool(name: str) -> str:
    # Only a whole word is a tool name, not part of a path or of a flag.
    return rf"(?<![-\w/.]){name}(?![-\w/.])"


_python = f'"{sys.executable}"'
config.substitutions.append((_tool("flagtree-opt"), f"{_python} -m flagtree.cli.opt"))  # noqa: F821
config.substitutions.append((_tool("filecheck"), f"{_python} -m filecheck"))  # noqa: F821
