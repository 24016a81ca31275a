"""specdec: speculative decoding for DeepSeek-V3 with its Multi-Token Prediction module."""

from .api import BUNDLED_MODEL, LLM
from .params import SamplingParams, SpecConfig

__all__ = ["BUNDLED_MODEL", "LLM", "SamplingParams", "SpecConfig"]
