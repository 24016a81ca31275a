"""Run by the TP tests under torchrun: `torchrun [--nnodes ...] --nproc-per-node N tests/tp_torchrun.py CKPT OUT`.

Every rank builds LLM(tensor_parallel_size=WORLD_SIZE); rank 0 makes the calls and the others follow its plans
(the torchrun path, on one node or several). Each draft tree is all-gathered and checked identical on every rank
(each rank drafts from the same logits and seeds; drafts are not shipped). Rank 0 writes its outputs and every
rank its draft checks to OUT/rank{r}.json, for the test to compare with one rank.
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
    result = {}
    if dist.get_rank() == 0:
        greedy = llm.generate(PROMPTS, GREEDY)
        result["greedy"] = [o.token_ids for o in greedy]
        result["accepted"] = [o.metrics.accepted_per_position for o in greedy]
        result["sampled"] = [o.token_ids for o in llm.generate(PROMPTS, SAMPLED)]
        result["logits"] = llm.logits(PROMPTS[0]).tolist()
        llm.close()
    else:
        llm.follow()
    with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(result | {"drafts_same": checked}, f)
    dist.barrier()
    shutdown_distributed()  # leave the group before exit: gloo's threads must not outlive it


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
