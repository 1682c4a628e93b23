"""Codegen backends (installed as `flagtree.backends`); one package per backend."""
