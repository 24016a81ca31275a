"""Train the bundled demo model: a small DeepSeek-V3 (MLA, DeepSeekMoE, MTP depth 1) on the Python standard library.

Runs on a laptop CPU in under an hour and writes the released layout (FP8 e4m3 + 128x128 scales) to
specdec/bundled/, so the runtime computes exactly what was trained: training uses our own `DeepseekV3`.

Stage 1 trains the main model and the MTP layer together: loss = CE(next token) + 0.3 * CE(MTP, token i+2), with
DeepSeek-V3's auxiliary-loss-free balancing (after each optimizer step every MoE router's
`e_score_correction_bias` moves by +gamma for under-loaded experts and -gamma for over-loaded ones).
Stage 2 freezes the main model and distills the MTP layer on the main model's own next-token distribution at
i+1 (KL), which is what the acceptance of a first draft token measures.

Both stages are sized by wall time (the learning rate decays over elapsed time, not steps), so a run finishes on
schedule on a slower machine and simply sees fewer tokens.

    OMP_WAIT_POLICY=PASSIVE python bench/train_tiny.py --out /tmp/bundled_out --stage1-min 30 --stage2-min 6
    python bench/train_tiny.py --out specdec/bundled --measure-only   # agreement + greedy sample via specdec.LLM

(One intra-op thread by default: on a busy 2-core machine two threads ran 3x slower, waiting at barriers.)
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from specdec.kernels.mla import AttnMeta
from specdec.model import LatentCache
from specdec.model.checkpoint import save_checkpoint, tiny_config
from specdec.model.config import ModelConfig
from specdec.model.moe import Gate, MoE
from specdec.model.transformer import DeepseekV3
from tqdm import tqdm

from specdec.prompts import HELD_OUT  # the held-out modules, shared with the benchmarks

# standard-library folders that are not training text (HELD_OUT lists the held-out modules)
EXCLUDED_DIRS = frozenset({"test", "tests", "idlelib", "lib2to3", "site-packages"})
BOS, EOS = "<|begin▁of▁sentence|>", "<|end▁of▁sentence|>"
MTP_WEIGHT = 0.3  # the paper's lambda for the first 10T tokens

CONFIG: dict[str, Any] = tiny_config(
    vocab_size=4096, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
    q_lora_rank=256, kv_lora_rank=192, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64,
    n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
    first_k_dense_replace=1, routed_scaling_factor=1.5, num_nextn_predict_layers=1,
    max_position_embeddings=4096, rope_theta=10000,
    quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                         "weight_block_size": [128, 128]},
)


# data -------------------------------------------------------------------------------------------------------------
def stdlib_files() -> tuple[list[Path], list[Path]]:
    """(training files, held-out files) of this interpreter's standard library, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not EXCLUDED_DIRS & set(p.relative_to(root).parts[:-1]))
    held = [root / n for n in HELD_OUT]
    missing = [str(p) for p in held if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"held-out modules missing from this stdlib: {missing}")
    return [p for p in files if p not in held], held


def read(p: Path) -> str:
    return p.read_text(encoding="utf-8", errors="replace")


def train_tokenizer(files: list[Path], vocab: int, out: Path) -> Any:
    """Byte-level BPE with DeepSeek-V3's bos (id 0) and eos (id 1) specials; writes out/tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((read(p) for p in files), trainer)
    assert tok.token_to_id(BOS) == 0 and tok.token_to_id(EOS) == 1
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    return tok


def encode_files(tok: Any, files: list[Path]) -> torch.Tensor:
    """One stream: bos + file + eos per file."""
    ids: list[int] = []
    for enc in tok.encode_batch([read(p) for p in files]):
        ids += [0, *enc.ids, 1]
    return torch.tensor(ids, dtype=torch.long)


def batch(stream: torch.Tensor, b: int, n: int, rng: random.Random) -> torch.Tensor:
    """[b, n] random windows of the token stream."""
    starts = [rng.randrange(0, stream.numel() - n) for _ in range(b)]
    return torch.stack([stream[s:s + n] for s in starts])


# model ------------------------------------------------------------------------------------------------------------
def build_model(cfg: ModelConfig, seed: int) -> DeepseekV3:
    """Our DeepseekV3 in float32 (naive MLA), GPT-style init, expert weights stacked, every weight trainable."""
    torch.manual_seed(seed)
    model = DeepseekV3(cfg, dtype=torch.float32, mla_mode="naive")
    n_layers = cfg.num_layers_with_mtp
    for name, p in model.named_parameters():
        if "norm" in name:
            torch.nn.init.ones_(p)
        elif name.endswith("e_score_correction_bias"):
            torch.nn.init.zeros_(p)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            torch.nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layers))
        else:
            torch.nn.init.normal_(p, std=0.02)
    model.finalize()
    for m in model.modules():  # stacked experts: the down projections get the residual-scaled init too
        if isinstance(m, MoE):
            torch.nn.init.normal_(m.w2, std=0.02 / math.sqrt(2 * n_layers))
    for name, p in model.named_parameters():
        p.requires_grad_(p.is_floating_point() and not name.endswith("e_score_correction_bias"))
    return model.train()


def attn_meta(b: int, n: int) -> AttnMeta:
    """b causal sequences of n tokens packed into T = b * n slots."""
    return AttnMeta.contiguous(torch.arange(b) * n, [0] * b, [n] * b)


class LoadCounter:
    """Counts each router's chosen expert ids (forward hooks, training mode only) for aux-loss-free balancing."""

    def __init__(self, model: DeepseekV3, gamma: float):
        self.gamma = gamma
        self.gates = [m for m in model.modules() if isinstance(m, Gate)]
        self.loads = {id(g): torch.zeros(g.cfg.n_routed_experts) for g in self.gates}
        for g in self.gates:
            g.register_forward_hook(self._hook)

    def _hook(self, gate: Gate, _inp: Any, out: tuple[torch.Tensor, torch.Tensor]) -> None:
        if gate.training:  # evaluation forwards do not count
            self.loads[id(gate)] += torch.bincount(out[1].flatten(), minlength=gate.cfg.n_routed_experts).float()

    @torch.no_grad()
    def update(self) -> float:
        """Nudge every bias toward balance; returns the worst max/mean load ratio of this step."""
        worst = 0.0
        for g in self.gates:
            load = self.loads[id(g)]
            if load.sum() > 0:
                g.e_score_correction_bias += self.gamma * torch.sign(load.mean() - load)
                worst = max(worst, float(load.max() / load.mean()))
            load.zero_()
        return worst


def forward_losses(model: DeepseekV3, x: torch.Tensor, *, train_main: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [B, N] tokens -> (main CE, MTP CE, main logits [B, N, V], MTP logits [B, N-1, V]).

    MTP row i of a sequence pairs the main hidden state at i (after model.norm) with the embedding of token i+1
    and predicts token i+2 (DeepseekV3.mtp_forward on tokens[1:], hidden[:-1], positions[1:]).
    """
    cfg = model.cfg
    b, n = x.shape
    pos = torch.arange(n).repeat(b)
    with torch.set_grad_enabled(train_main and torch.is_grad_enabled()):
        cache = LatentCache(cfg.num_hidden_layers, b * n, cfg.kv_cache_dim, torch.float32, "cpu")
        hidden = model(x.flatten(), pos, attn_meta(b, n), cache).view(b, n, -1)
        logits = model.logits(hidden.flatten(0, 1)).view(b, n, -1)
    m = n - 1
    mcache = LatentCache(1, b * m, cfg.kv_cache_dim, torch.float32, "cpu")
    h_mtp = model.mtp_forward(0, x[:, 1:].flatten(), hidden[:, :-1].flatten(0, 1), torch.arange(1, n).repeat(b),
                              attn_meta(b, m), mcache)
    mtp_logits = model.logits(h_mtp).view(b, m, -1)
    v = cfg.vocab_size
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, v), x[:, 1:].flatten())
    mtp_ce = F.cross_entropy(mtp_logits[:, :-1].reshape(-1, v), x[:, 2:].flatten())
    return ce, mtp_ce, logits, mtp_logits


@torch.no_grad()
def evaluate(model: DeepseekV3, stream: torch.Tensor, n: int, max_windows: int = 24) -> dict[str, float]:
    """Held-out main CE, MTP CE and MTP top-1 agreement with the main model's next argmax (fixed windows)."""
    model.eval()
    starts = list(range(0, stream.numel() - n, n))[:max_windows]
    x = torch.stack([stream[s:s + n] for s in starts])
    out = {"ce": 0.0, "mtp_ce": 0.0, "agree": 0.0}
    for chunk in x.split(8):
        ce, mtp_ce, logits, mtp_logits = forward_losses(model, chunk)
        agree = (mtp_logits[:, :-1].argmax(-1) == logits[:, 1:-1].argmax(-1)).float().mean()
        w = chunk.shape[0] / x.shape[0]
        out["ce"] += w * float(ce)
        out["mtp_ce"] += w * float(mtp_ce)
        out["agree"] += w * float(agree)
    model.train()
    return out


def run_stage(name: str, minutes: float, step: Callable[[float], dict[str, float]], lr_max: float,
              opt: torch.optim.Optimizer, warmup: int, ckpt: Callable[[], None]) -> tuple[int, dict[str, float]]:
    """Steps until `minutes` of wall time pass; lr: linear warmup, then cosine over elapsed time to 10%."""
    t0, i, stats = time.time(), 0, {}
    bar = tqdm(desc=name, unit="step", mininterval=10)
    last_ckpt = t0
    while (frac := (time.time() - t0) / (60 * minutes)) < 1:
        lr = lr_max * min(1.0, (i + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        stats = step(lr)
        i += 1
        bar.update()
        bar.set_postfix({k: f"{v:.3f}" for k, v in stats.items()} | {"lr": f"{lr:.1e}"}, refresh=False)
        if time.time() - last_ckpt > 300:
            ckpt()
            last_ckpt = time.time()
    bar.close()
    return i, stats


def checkpoint_tensors(model: DeepseekV3) -> dict[str, torch.Tensor]:
    """State dict under the released names: stacked experts unstacked into experts.{e}.{gate,up,down}_proj."""
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if name.endswith((".mlp.w13", ".mlp.w2")):
            p = name.rsplit(".", 1)[0]
            for e in range(t.shape[0]):
                if name.endswith("w13"):
                    gate, up = t[e].chunk(2)
                    out[f"{p}.experts.{e}.gate_proj.weight"] = gate
                    out[f"{p}.experts.{e}.up_proj.weight"] = up
                else:
                    out[f"{p}.experts.{e}.down_proj.weight"] = t[e]
        else:
            out[name] = t
    return out


def measure_bundle(path: Path, window: int = 512, new_tokens: int = 48) -> dict[str, Any]:
    """Load the shipped checkpoint through the public API and measure it on the held-out modules.

    agree = MTP top-1 == the main model's next argmax (LLM.mtp_logits row i vs LLM.logits row i+1): the chain
    acceptance rate of a first greedy draft token. Also a greedy continuation of a held-out prompt.
    """
    from tokenizers import Tokenizer

    from specdec import LLM

    llm = LLM(path, dtype="float32", speculative=None)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    _, held_files = stdlib_files()
    hits = n = 0
    nll = 0.0
    for f in held_files:
        ids = [0, *tok.encode(read(f)).ids][:window]
        logits, mtp = llm.logits(ids), llm.mtp_logits(ids)
        hits += int((mtp.argmax(-1) == logits[1:].argmax(-1)).sum())
        n += mtp.shape[0]
        nll += float(F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum"))
    prompt = [0, *tok.encode(read(held_files[HELD_OUT.index("textwrap.py")])).ids][:160]
    ids = list(prompt)
    for _ in range(new_tokens):
        ids.append(int(llm.logits(ids)[-1].argmax()))
    return {"agree": hits / n, "positions": n, "heldout_ce": nll / (n + len(held_files)),
            "prompt_tail": tok.decode(prompt[-40:]), "greedy": tok.decode(ids[len(prompt):])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("specdec/bundled"))
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "train_tiny")
    ap.add_argument("--stage1-min", type=float, default=30.0)
    ap.add_argument("--stage2-min", type=float, default=6.0)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--distill-lr", type=float, default=1e-3)
    ap.add_argument("--gamma", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--measure-only", action="store_true", help="only measure the checkpoint already at --out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.measure_only:
        print(json.dumps(measure_bundle(args.out), indent=2))
        return
    t_start = time.time()
    rng = random.Random(args.seed)
    args.work.mkdir(parents=True, exist_ok=True)

    train_files, held_files = stdlib_files()
    tok = train_tokenizer(train_files, CONFIG["vocab_size"], args.out)
    train, held = encode_files(tok, train_files), encode_files(tok, held_files)
    print(f"tokenizer + data: {len(train_files)} files, {train.numel()} train / {held.numel()} held-out tokens "
          f"({time.time() - t_start:.0f}s)")

    cfg = ModelConfig.from_dict(CONFIG)
    model = build_model(cfg, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters")
    balance = LoadCounter(model, args.gamma)
    save = lambda: torch.save(model.state_dict(), args.work / "model.pt")

    # stage 1: main + MTP
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            betas=(0.9, 0.95))

    def step1(lr: float) -> dict[str, float]:
        ce, mtp_ce, _, _ = forward_losses(model, batch(train, args.batch, args.seq, rng))
        opt.zero_grad(set_to_none=True)
        (ce + MTP_WEIGHT * mtp_ce).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return {"ce": ce.item(), "mtp": mtp_ce.item(), "imb": balance.update()}

    steps1, last1 = run_stage("stage1 main+mtp", args.stage1_min, step1, args.lr, opt, 50, save)
    save()
    ev1 = evaluate(model, held, args.seq)
    print(f"stage1: {steps1} steps, {steps1 * args.batch * args.seq} tokens, train {last1}, held-out {ev1}")

    # stage 2: distill the MTP layer on the frozen main model's distribution at i+1
    mtp = model.mtp_layers[0]
    for p in model.parameters():
        p.requires_grad_(False)
    for name, p in mtp.named_parameters():
        p.requires_grad_(p.is_floating_point() and not name.endswith("e_score_correction_bias"))
    main_gates = {id(m) for layer in model.model.layers[:cfg.num_hidden_layers] for m in layer.modules()}
    balance.gates = [g for g in balance.gates if id(g) not in main_gates]  # main routers stay as trained
    opt2 = torch.optim.AdamW([p for p in mtp.parameters() if p.requires_grad], betas=(0.9, 0.95),
                             weight_decay=0.0)

    def step2(lr: float) -> dict[str, float]:
        x = batch(train, args.batch, args.seq, rng)
        ce, mtp_ce, logits, mtp_logits = forward_losses(model, x, train_main=False)
        target = logits[:, 1:].detach().log_softmax(-1)  # main model's distribution for token i+2
        kl = F.kl_div(mtp_logits.log_softmax(-1), target, log_target=True, reduction="none").sum(-1).mean()
        opt2.zero_grad(set_to_none=True)
        kl.backward()
        torch.nn.utils.clip_grad_norm_(mtp.parameters(), 1.0)
        opt2.step()
        agree = (mtp_logits.argmax(-1) == logits[:, 1:].argmax(-1)).float().mean()
        return {"kl": kl.item(), "mtp": mtp_ce.item(), "agree": agree.item(), "imb": balance.update()}

    steps2, last2 = run_stage("stage2 distill", args.stage2_min, step2, args.distill_lr, opt2, 20, save)
    save()
    ev2 = evaluate(model, held, args.seq)
    print(f"stage2: {steps2} steps, train {last2}, held-out {ev2}")

    save_checkpoint(args.out, CONFIG, checkpoint_tensors(model), num_shards=2)
    summary = {"steps1": steps1, "steps2": steps2, "tokens1": steps1 * args.batch * args.seq,
               "tokens2": steps2 * args.batch * args.seq, "train1": last1, "train2": last2,
               "heldout1": ev1, "heldout2": ev2, "params": n_params, "wall_s": time.time() - t_start,
               "args": {k: str(v) for k, v in vars(args).items()}}
    (args.work / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"wall time {time.time() - t_start:.0f}s; wrote {args.out}")


if __name__ == "__main__":
    main()
