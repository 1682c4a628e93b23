"""flagtree: a torch.compile backend and AI compiler frontend.

`torch.compile(model, backend="flagtree")` works without importing this package first
(the backend is registered through the `torch_dynamo_backends` entry point).
"""

__version__ = "0.1.0"
