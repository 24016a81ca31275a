"""specdec: speculative decoding for DeepSeek-V3 with its Multi-Token Prediction module."""
