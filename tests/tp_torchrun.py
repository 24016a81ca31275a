"""Run by tests/test_tp.py under torchrun: `torchrun --nproc-per-node N tests/tp_torchrun.py CKPT OUT`.

Every rank builds LLM(tensor_parallel_size=N) and makes the same calls (the torchrun path). Each draft tree is
all-gathered and checked identical on every rank (drafts are computed on every rank, not broadcast); each rank
writes its outputs to OUT/rank{r}.json for the test to compare with one rank.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from specdec import LLM, SamplingParams, SpecConfig
from specdec.drafter import Drafter
from specdec.model.parallel import shutdown_distributed

CHAIN = SpecConfig(num_speculative_tokens=3)
PROMPTS = [[5, 9, 200], [17], [3, 4, 5, 6, 7, 8]]
GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
SAMPLED = [SamplingParams(max_tokens=16, temperature=0.8, top_p=0.9, seed=s, ignore_eos=True) for s in (1, 2, 3)]


def same_on_every_rank(t: torch.Tensor) -> bool:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return all(torch.equal(parts[0], p) for p in parts)


def main(ckpt: str, out: str) -> None:
    torch.set_num_threads(1)
    llm = LLM(ckpt, dtype="float32", speculative=CHAIN, tensor_parallel_size=int(os.environ["WORLD_SIZE"]))
    draft, checked = Drafter.draft, []

    def checked_draft(self: Drafter, *args, **kwargs):
        d = draft(self, *args, **kwargs)
        tree = d.tree
        checked.append(all(same_on_every_rank(t) for t in (tree.tokens, tree.parents, tree.mask, tree.paths))
                       and (d.q is None or same_on_every_rank(d.q)))
        return d

    Drafter.draft = checked_draft
    greedy = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    sampled = [o.token_ids for o in llm.generate(PROMPTS, SAMPLED)]
    logits = llm.logits(PROMPTS[0]).tolist()
    with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump({"greedy": greedy, "sampled": sampled, "logits": logits, "drafts_same": checked}, f)
    llm.close()
    dist.barrier()
    shutdown_distributed()  # leave the group before exit: gloo's threads must not outlive it


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
