"""HF transformers as the test oracle: the same tiny checkpoint through DeepseekV3ForCausalLM and MtpModel."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from specdec.kernels.fp8 import weight_dequant_ref


def dequantized_copy(src: Path, dst: Path) -> Path:
    """A float32 single-file copy of a (possibly FP8) checkpoint, dequantized by us, without quantization_config.

    transformers' own FP8 loader derives the block size from the scale grid, which is wrong for partial blocks."""
    cfg = json.loads((src / "config.json").read_text())
    q = cfg.pop("quantization_config", None)
    bn, bk = q["weight_block_size"] if q else (128, 128)
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(f))
    out = {}
    for name, t in tensors.items():
        if name.endswith("weight_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            t = weight_dequant_ref(t, tensors[name + "_scale_inv"], bn, bk)
        out[name] = t.float().contiguous()
    dst.mkdir(parents=True, exist_ok=True)
    cfg["torch_dtype"] = "float32"
    (dst / "config.json").write_text(json.dumps(cfg))
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def hf_models(ckpt: Path, work: Path):
    """(DeepseekV3ForCausalLM, MtpModel) in float32 for a checkpoint directory."""
    import transformers
    from transformers import DeepseekV3ForCausalLM
    from transformers.modeling_layers import MtpModel

    transformers.logging.set_verbosity_error()
    plain = dequantized_copy(ckpt, work)
    n = json.loads((plain / "config.json").read_text())["num_hidden_layers"]
    # transformers looks for MTP weights at layer 61 only; point it at the tiny model's MTP layer index
    DeepseekV3ForCausalLM._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{n}.*"]
    main = DeepseekV3ForCausalLM.from_pretrained(str(plain), dtype=torch.float32, attn_implementation="eager").eval()
    mtp = MtpModel.from_pretrained(main).eval()
    return main, mtp


@torch.no_grad()
def hf_logits(main, ids: list[int]) -> torch.Tensor:
    return main(torch.tensor([ids])).logits[0].float()


@torch.no_grad()
def hf_mtp_logits(main, mtp, ids: list[int]) -> torch.Tensor:
    """Row i: MTP logits for token i+2 from the main hidden state at i (after model.norm) and token i+1."""
    x = torch.tensor([ids])
    hidden = main.model(x).last_hidden_state  # [1, T, D] after model.norm
    pos = torch.arange(1, len(ids))[None]
    h = mtp.forward_layer(0, hidden[:, :-1], pos, None, input_ids=x[:, 1:])
    return mtp._project_to_logits(h)[0].float()
