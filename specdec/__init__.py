"""specdec: speculative decoding for DeepSeek-V3 with its Multi-Token Prediction module.

The public names load on first use, so `import specdec.kernels.fp8` (or the CLI's `--help`) does not pull in the
engine and the model.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .api import BUNDLED_MODEL, LLM
    from .params import SamplingParams, SpecConfig

try:
    __version__ = version("specdec")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

_PUBLIC = {"BUNDLED_MODEL": ".api", "LLM": ".api", "SamplingParams": ".params", "SpecConfig": ".params"}
__all__ = ["BUNDLED_MODEL", "LLM", "SamplingParams", "SpecConfig", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(import_module(_PUBLIC[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'specdec' has no attribute {name!r}")
