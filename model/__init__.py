"""DeepSeek-V3 (+ MTP) in PyTorch: config, MLA, MoE, latent cache, checkpoint layout and loader."""

from .cache import KVPoolError, LatentCache
from .config import ConfigError, ModelConfig
from .loader import Checkpoint, CheckpointError, load_model
from .transformer import DeepseekV3

__all__ = ["Checkpoint", "CheckpointError", "ConfigError", "DeepseekV3", "KVPoolError", "LatentCache",
           "ModelConfig", "load_model"]
