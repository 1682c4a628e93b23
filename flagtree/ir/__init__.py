"""FTIR: flagtree's tensor IR (types, ops, builder, printer, parser, verifier)."""

from flagtree.ir.attributes import DenseAttr, ResourceAttr
from flagtree.ir.builder import Builder, new_function
from flagtree.ir.core import Block, BlockArgument, Location, Module, Operation, OpResult, Region, Value
from flagtree.ir.parser import clone_module, parse_file, parse_module
from flagtree.ir.printer import print_module, print_op
from flagtree.ir.types import FunctionType, ScalarType, TensorType, Type, parse_type, scalar, tensor
from flagtree.ir.verifier import verify

__all__ = [
    "Block",
    "BlockArgument",
    "Builder",
    "DenseAttr",
    "FunctionType",
    "Location",
    "Module",
    "OpResult",
    "Operation",
    "Region",
    "ResourceAttr",
    "ScalarType",
    "TensorType",
    "Type",
    "Value",
    "clone_module",
    "new_function",
    "parse_file",
    "parse_module",
    "parse_type",
    "print_module",
    "print_op",
    "scalar",
    "tensor",
    "verify",
]
