"""Tiny checkpoints whose MTP agrees with the main model part of the time, so acceptance paths get exercised.

Random weights accept nothing. Here the main model mostly predicts next = perm(current) (lm_head rows are the
permuted embeddings) and the MTP mostly predicts perm(token i+1) (eh_proj passes the embedding half through);
`noise` scales every other weight, so attention and MoE perturb both and drafts are accepted only sometimes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from specdec.model.checkpoint import random_tensors, save_checkpoint, tiny_config
from specdec.model.config import ModelConfig

VOCAB = 300  # a byte-level BPE's 256 byte symbols + 2 specials + a few merges


def agreeable_checkpoint(path: Path, *, seed: int = 0, noise: float = 0.15, head_scale: float = 0.3,
                         num_shards: int = 2, **overrides: Any) -> Path:
    cfgd = tiny_config(**overrides)
    cfg = ModelConfig.from_dict(cfgd)
    t = random_tensors(cfg, seed=seed, std=noise)
    g = torch.Generator().manual_seed(seed + 1)
    perm = torch.randperm(cfg.vocab_size, generator=g)
    t["lm_head.weight"] = t["model.embed_tokens.weight"][torch.argsort(perm)] * head_scale
    d = cfg.hidden_size
    for layer in range(cfg.num_hidden_layers, cfg.num_layers_with_mtp):
        eh = noise * torch.randn(d, 2 * d, generator=g)
        eh[:, :d] += torch.eye(d)
        t[f"model.layers.{layer}.eh_proj.weight"] = eh
    return save_checkpoint(path, cfgd, t, num_shards)


def byte_bpe(texts: list[str], vocab: int = VOCAB) -> Any:
    """A byte-level BPE (tokenizers.Tokenizer) with DeepSeek-V3's bos/eos specials, trained on `texts`, for tiny
    checkpoints that take text prompts; its post-processor puts the BOS before a text, as the bundled model's does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    bos, eos = "<|begin▁of▁sentence|>", "<|end▁of▁sentence|>"
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[bos, eos],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    return tok
