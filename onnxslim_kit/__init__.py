"""onnxslim-kit: ONNX compression optimizer with an onnxruntime parity gate.

Python API (mirrors the CLI)::

    import onnxslim_kit
    model, report = onnxslim_kit.optimize("model.onnx", output="slim.onnx")
"""

__version__ = "0.1.0"

from .analyze import analyze  # noqa: E402
from .api import compare, inspect, optimize  # noqa: E402
from .search import search  # noqa: E402

__all__ = ["optimize", "inspect", "compare", "analyze", "search", "__version__"]
