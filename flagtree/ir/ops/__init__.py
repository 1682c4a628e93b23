"""The FTIR core op set; importing this package registers every op definition."""

from flagtree.ir.ops import attention, elementwise, linalg, misc, reduction, shape  # noqa: F401
