"""Train the bundled demo model: a small DeepSeek-V3 (MLA, DeepSeekMoE, MTP depth 1) on the Python standard library.

The model is a miniature of the release's cost structure: 16 main layers (the first dense) and one MTP layer, so a
draft step costs a small fraction of a main forward; 16 routed experts with top-2 in 4 groups (2 chosen) plus a
shared expert, so a multi-token verification pays the union-of-experts cost the released model pays; every linear
dimension a multiple of 128 (whole FP8 blocks). It is written in the released layout (FP8 e4m3 + 128x128 scales)
to specdec/bundled/, and trained with our own `DeepseekV3`, so the runtime computes exactly what was trained.

Stage 1 trains the main model and the MTP layer together: loss = CE(next token) + 0.3 * CE(MTP, token i+2), with
DeepSeek-V3's auxiliary-loss-free balancing (after each optimizer step every MoE router's
`e_score_correction_bias` moves by +gamma for under-loaded experts and -gamma for over-loaded ones). Experts run
sparsely: each token's chosen experts only. Stage 2 freezes the main model and distills the MTP layer on the main
model's own next-token distribution at i+1 (KL), which is what the acceptance of a first draft token measures.

Both stages are sized by wall time (the learning rate decays over elapsed time, not steps), so a run finishes on
schedule on a slower machine and simply sees fewer tokens. Every few minutes the whole state (weights, AdamW moments,
data RNG, elapsed time) goes to --work as safetensors + JSON; --resume continues from it after an interruption.

    python bench/train_tiny.py --out /tmp/bundled_out --stage1-min 105 --stage2-min 15    # then copy to specdec/bundled
    python bench/train_tiny.py --out /tmp/bundled_out --resume                             # after an interruption
    python bench/train_tiny.py --out specdec/bundled --measure-only   # agreement + greedy sample via specdec.LLM

(One intra-op thread by default, so the other core stays free: on a busy 2-core machine two threads ran 3x slower.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sysconfig
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from specdec.kernels.attn_meta import AttnMeta
from specdec.model.cache import LatentCache
from specdec.model.checkpoint import save_checkpoint, tiny_config
from specdec.model.config import ModelConfig
from specdec.model.moe import Gate, MoE
from specdec.model.transformer import DeepseekV3
from specdec.prompts import HELD_OUT  # the held-out modules, shared with the benchmarks

# standard-library folders that are not training text (HELD_OUT lists the held-out modules)
# encodings/ is codec tables (a large share of the bytes, and what a small model then repeats), not code
EXCLUDED_DIRS = frozenset({"test", "tests", "idlelib", "lib2to3", "site-packages", "encodings"})
BOS, EOS = "<|begin▁of▁sentence|>", "<|end▁of▁sentence|>"
MTP_WEIGHT = 0.3  # the paper's lambda for the first 10T tokens

CONFIG: dict[str, Any] = tiny_config(
    vocab_size=4096, hidden_size=256, intermediate_size=1024, moe_intermediate_size=128,
    num_hidden_layers=16, num_attention_heads=4, num_key_value_heads=4,
    q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=128, v_head_dim=64,
    n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
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
    """Byte-level BPE with DeepSeek-V3's bos (id 0) and eos (id 1) specials, the BOS put before a text by its
    post-processor (as LLM encodes text prompts); writes out/tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator((read(p) for p in files), trainer)
    assert tok.token_to_id(BOS) == 0 and tok.token_to_id(EOS) == 1
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, 0)])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    return tok


def encode_files(tok: Any, files: list[Path]) -> torch.Tensor:
    """One stream: bos + file + eos per file."""
    ids: list[int] = []
    for enc in tok.encode_batch([read(p) for p in files], add_special_tokens=False):
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


@dataclass
class Progress:
    """Where a run stands: the stage, per-stage steps and elapsed seconds, the data RNG, finished evaluations."""

    stage: int = 1
    steps: dict[str, int] = field(default_factory=lambda: {"1": 0, "2": 0})
    elapsed: dict[str, float] = field(default_factory=lambda: {"1": 0.0, "2": 0.0})
    last: dict[str, dict[str, float]] = field(default_factory=dict)  # last training stats per stage
    heldout: dict[str, dict[str, float]] = field(default_factory=dict)  # evaluation after each stage
    rng: Any = None  # random.Random state of the batch sampler
    wall_s: float = 0.0  # everything, tokenizer and evaluation included, over every session


def save_state(work: Path, model: DeepseekV3, opt: torch.optim.Optimizer, prog: Progress) -> None:
    """Weights + AdamW state as safetensors, progress as JSON, each replaced atomically (never a pickle)."""
    sd = opt.state_dict()
    tensors = {f"model.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    for i, st in sd["state"].items():
        for k, v in st.items():
            tensors[f"opt.{i}.{k}"] = torch.as_tensor(v).clone().contiguous()
    save_file(tensors, str(work / "state.safetensors.tmp"))
    os.replace(work / "state.safetensors.tmp", work / "state.safetensors")
    meta = asdict(prog) | {"param_groups": sd["param_groups"]}
    (work / "state.json.tmp").write_text(json.dumps(meta))
    os.replace(work / "state.json.tmp", work / "state.json")


def load_state(work: Path, model: DeepseekV3) -> tuple[Progress, dict[str, Any]]:
    """Restore the weights; returns the progress and the optimizer state dict (for the stage's optimizer)."""
    meta = json.loads((work / "state.json").read_text())
    groups = meta.pop("param_groups")
    prog = Progress(**meta)
    tensors = load_file(str(work / "state.safetensors"))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, name = k.split(".", 2)
            state.setdefault(int(i), {})[name] = v
    return prog, {"state": state, "param_groups": groups}


def run_stage(name: str, minutes: float, step: Callable[[float], dict[str, float]], lr_max: float,
              opt: torch.optim.Optimizer, warmup: int, prog: Progress, stage: str, ckpt: Callable[[], None],
              ckpt_every_s: float = 300) -> None:
    """Steps until `minutes` of wall time pass in this stage (over every session); lr: linear warmup, then cosine
    over elapsed time to 10%. prog.steps/elapsed/last[stage] advance as it goes; ckpt() runs every few minutes."""
    t_done, i = prog.elapsed[stage], prog.steps[stage]
    t0 = time.time() - t_done
    bar = tqdm(desc=name, unit="step", mininterval=10, initial=i,
               total=None if not i else int(i * 60 * minutes / max(t_done, 1e-9)))
    last_ckpt = time.time()
    while (frac := (time.time() - t0) / (60 * minutes)) < 1:
        lr = lr_max * min(1.0, (i + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        stats = step(lr)
        i += 1
        prog.steps[stage], prog.elapsed[stage], prog.last[stage] = i, time.time() - t0, stats
        bar.update()
        bar.set_postfix({k: f"{v:.3f}" for k, v in stats.items()} | {"lr": f"{lr:.1e}"}, refresh=False)
        if time.time() - last_ckpt > ckpt_every_s:
            ckpt()
            last_ckpt = time.time()
    bar.close()


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
        ids = [0, *tok.encode(read(f), add_special_tokens=False).ids][:window]
        logits, mtp = llm.logits(ids), llm.mtp_logits(ids)
        hits += int((mtp.argmax(-1) == logits[1:].argmax(-1)).sum())
        n += mtp.shape[0]
        nll += float(F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum"))
    prompt = [0, *tok.encode(read(held_files[HELD_OUT.index("textwrap.py")]), add_special_tokens=False).ids][:160]
    ids = list(prompt)
    for _ in range(new_tokens):
        ids.append(int(llm.logits(ids)[-1].argmax()))
    return {"agree": hits / n, "positions": n, "heldout_ce": nll / (n + len(held_files)),
            "prompt_tail": tok.decode(prompt[-40:]), "greedy": tok.decode(ids[len(prompt):])}


def load_tokenizer(path: Path | None, train_files: list[Path], out: Path) -> Any:
    """The tokenizer at `path` (copied to out/), else a new one trained on the training files."""
    from tokenizers import Tokenizer

    if path is not None and path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        if path.resolve() != (out / "tokenizer.json").resolve():
            shutil.copyfile(path, out / "tokenizer.json")
        return Tokenizer.from_file(str(path))
    return train_tokenizer(train_files, CONFIG["vocab_size"], out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("specdec/bundled"))
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "train_tiny",
                    help="resumable state (safetensors + JSON), saved every few minutes")
    ap.add_argument("--resume", action="store_true", help="continue the run whose state is in --work")
    ap.add_argument("--tokenizer", type=Path, default=Path(__file__).parent.parent / "specdec/bundled/tokenizer.json",
                    help="reuse this tokenizer.json (default: the bundled one); a new one is trained if it is missing")
    ap.add_argument("--stage1-min", type=float, default=105.0)
    ap.add_argument("--stage2-min", type=float, default=15.0)
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
    t_session = time.time()
    args.work.mkdir(parents=True, exist_ok=True)
    train_files, held_files = stdlib_files()
    tok = load_tokenizer(args.tokenizer, train_files, args.out)
    train, held = encode_files(tok, train_files), encode_files(tok, held_files)
    print(f"data: {len(train_files)} files, {train.numel()} train / {held.numel()} held-out tokens")

    cfg = ModelConfig.from_dict(CONFIG)
    model = build_model(cfg, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters")
    balance = LoadCounter(model, args.gamma)
    rng = random.Random(args.seed)
    prog, opt_state = Progress(), None
    if args.resume:
        prog, opt_state = load_state(args.work, model)
        rng.setstate((prog.rng[0], tuple(prog.rng[1]), prog.rng[2]))
        print(f"resumed stage {prog.stage}: {prog.steps} steps, {prog.elapsed} s")
    wall0 = prog.wall_s

    def ckpt(opt: torch.optim.Optimizer) -> None:
        prog.rng, prog.wall_s = rng.getstate(), wall0 + time.time() - t_session
        save_state(args.work, model, opt, prog)

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

    if prog.stage == 1:
        if opt_state is not None:
            opt.load_state_dict(opt_state)
        run_stage("stage1 main+mtp", args.stage1_min, step1, args.lr, opt, 100, prog, "1", lambda: ckpt(opt))
        prog.heldout["1"] = evaluate(model, held, args.seq)
        print(f"stage1: {prog.steps['1']} steps, train {prog.last['1']}, held-out {prog.heldout['1']}")
        prog.stage, opt_state = 2, None
        ckpt(opt)

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
    if opt_state is not None:
        opt2.load_state_dict(opt_state)

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

    run_stage("stage2 distill", args.stage2_min, step2, args.distill_lr, opt2, 20, prog, "2", lambda: ckpt(opt2))
    prog.heldout["2"] = evaluate(model, held, args.seq)
    print(f"stage2: {prog.steps['2']} steps, train {prog.last['2']}, held-out {prog.heldout['2']}")
    ckpt(opt2)

    save_checkpoint(args.out, CONFIG, checkpoint_tensors(model), num_shards=2)
    tokens = {k: n * args.batch * args.seq for k, n in prog.steps.items()}
    summary = {"steps": prog.steps, "tokens": tokens, "train": prog.last, "heldout": prog.heldout,
               "stage_s": prog.elapsed, "params": n_params, "wall_s": wall0 + time.time() - t_session,
               "args": {k: str(v) for k, v in vars(args).items()}}
    (args.work / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
