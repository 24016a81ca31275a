"""Paths of the released checkpoint's reference data kept in the repo (tests/data)."""

from pathlib import Path

DATA = Path(__file__).parent / "data"
V3_CONFIG = DATA / "deepseek-v3-config.json"
V3_TENSORS = DATA / "deepseek-v3-tensors.json"
