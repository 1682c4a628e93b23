"""flagtree's PyTorch frontend: the torch.compile backend (`backend.py`), compile options,
the FX → FTIR importer and its aten mapping table, freezing, and per-graph compilation."""
