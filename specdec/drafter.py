"""The MTP drafter: extends the MTP layers' latent caches with committed tokens, then drafts a chain or a tree.

Draft step j (1-based, after the extend's last row drafted the root's children) applies MTP layer min(j, D-1) to
the previous step's output hidden state and the token just drafted; with the released model's D=1 the one layer is
reused at every step, as the peers' "MTP Eagle" mode does. Tree mode expands the `topk` best frontier nodes by
cumulative draft log-probability, each into its `topk` children, then keeps the best `num_draft_tokens` (EAGLE-2).

With a gate (adaptive speculation, the step plan's DraftShape.gate and each request's depth and floor), a node's
estimated acceptance is its calibrated confidence (cost_model.py) and its path's the product along it: a chain
stops where its path falls below the request's floor, a tree ranks by path acceptance and keeps only the nodes at
or above it, and a draft step runs only while the chains it would extend are expected to pay for it. Every input of
those decisions is rank 0's or a function of the logits every rank computes alike, as the drafted tokens are, so
every rank drafts the same ragged batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .draft_gate import ChainGate, TreeGate
from .kernels.attn_meta import AttnMeta
from .kv_pool import Rows
from .model.cache import LatentCache
from .model.transformer import DeepseekV3
from .sampling import SamplingBatch, gumbel_topk
from .step_clock import StepClock
from .step_plan import DraftShape
from .tree import Candidates, TokenTree, chain_tree, monotone_scores, rank_candidates, tree_of


@dataclass(frozen=True)
class Draft:
    """A decode batch's drafts: tree [B, N] (ragged: a request with fewer nodes than the widest is padded, depth
    -1); q [B, R, V] the draft distributions (rows indexed by tree.q_row), None if all greedy; chain: the tree is a
    chain (its mask is causal); steps: the MTP forwards drafting ran after the first head. A gated draft also holds,
    on the host, sizes[b] (request b's nodes, the root included), codes[b][i] and parents[b][i] (the calibration
    cell and parent node of its node i + 1, for rank 0's calibration), and index: the places of the real nodes among
    the B * N (None when no request is padded)."""

    tree: TokenTree
    q: torch.Tensor | None
    chain: bool = False
    steps: int = 0
    sizes: list[int] | None = None
    codes: list[list[int]] | None = None
    parents: list[list[int]] | None = None
    index: torch.Tensor | None = None

    @property
    def num_nodes(self) -> list[int]:
        """Each request's nodes, the root included."""
        b, n = self.tree.tokens.shape
        return self.sizes if self.sizes is not None else [n] * b

    def attn_mask(self) -> torch.Tensor | None:
        """The verify step's tree mask [T, N] over the real nodes (T of them) for AttnMeta.build; None for a chain
        (causal, which kernels without custom masks take)."""
        return None if self.chain else self.pack(self.tree.mask)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, N, ...] -> [T, ...]: the real nodes' rows, request by request (what the verify forward takes)."""
        b, n = self.tree.tokens.shape
        flat = x.reshape(b * n, *x.shape[2:])
        return flat if self.index is None else flat[self.index]

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, ...] (the verify forward's rows) -> [B * N, ...], zeros at padding nodes."""
        if self.index is None:
            return x
        b, n = self.tree.tokens.shape
        return x.new_zeros(b * n, *x.shape[1:]).index_copy_(0, self.index, x)

    @property
    def depth(self) -> int:
        """Draft levels of the widest request (the trees' depth bound)."""
        return self.tree.paths.shape[-1] - 1

    def depths(self, budget: int) -> list[int]:
        """Each request's deepest draft node (a tree drafted whole, ungated: the deepest its budget can reach)."""
        b, n = self.tree.tokens.shape
        if self.parents is None:
            return [n - 1 if self.chain else min(self.depth, budget)] * b
        out = []
        for ps in self.parents:
            d = [0]
            for p in ps:
                d.append(d[p] + 1)
            out.append(max(d))
        return out


class Drafter:
    """Drafts with the MTP layers of `model`; with a clock, each draft marks when its first head's children were
    drawn (head_mark: the cost model times the first head apart from the draft steps after it)."""

    def __init__(self, model: DeepseekV3, clock: StepClock | None = None):
        self.model, self.clock = model, clock
        self.head_mark: Any = None

    def _mark_head(self) -> None:
        if self.clock is not None:
            self.head_mark = self.clock.mark()

    def extend(self, nexts: list[list[int]], n_before: list[int], hidden: list[torch.Tensor],
               carry: list[list[torch.Tensor | None]], rows: Rows, cache: LatentCache) -> torch.Tensor:
        """Commit the MTP rows of newly committed tokens, in every MTP layer.

        Request b has the main model's hidden[b] ([k_b, D]) at rows n_before[b].., and nexts[b] (k_b tokens) are
        the tokens after those rows (tokens n_before[b] + 1..). Layer 0 row i pairs token i+1 with the main hidden
        state at i; layer L row i pairs token i+1+L with layer L-1's output at row i, so layer L holds rows up to
        (committed tokens - 1 - L). carry[b][L] keeps layer L's last output for the next call. Returns layer 0's
        last-row outputs [B, D]: they predict each root's first child. MTP row i of request b lives at slot
        rows.maps[b, i]."""
        dev = rows.maps.device
        ks = [h.shape[0] for h in hidden]
        outs = hidden  # layer L-1's outputs for each request, rows starting at max(n - L + 1, 0)
        g = None
        for layer in range(self.model.cfg.num_nextn_predict_layers):
            spans, x, hs, pos, keep = [], [], [], [], []
            for b, (n, k, o) in enumerate(zip(n_before, ks, outs)):
                r0, r1 = max(n - layer, 0), n + k - layer
                if r1 <= r0:
                    continue
                if layer and n >= layer:  # row n - L: layer L-1 computed it in the previous call (carry)
                    o = torch.cat([carry[b][layer - 1][None], o])
                keep.append(b)
                spans.append((r0, r1 - r0))
                hs.append(o[: r1 - r0])
                x += nexts[b][r0 + layer - n:r1 + layer - n]  # tokens r0 + 1 + L .. r1 + L
                pos.append(torch.arange(r0 + 1 + layer, r1 + 1 + layer, device=dev))
            if layer:
                for b, o in enumerate(outs):
                    carry[b][layer - 1] = o[-1] if o.shape[0] else carry[b][layer - 1]
            if not keep:
                break
            ctx, news = [r[0] for r in spans], [r[1] for r in spans]
            meta = rows.meta(ctx, news, keep=keep)
            out = self.model.mtp_forward(layer, torch.tensor(x, device=dev), torch.cat(hs), torch.cat(pos), meta,
                                         cache)
            split = list(out.split(news))
            outs = [torch.zeros(0, out.shape[-1], device=dev)] * len(n_before)
            for b, o in zip(keep, split):
                outs[b] = o
            if layer == 0:
                g = torch.stack([o[-1] for o in split])
        return g

    def _layer(self, j: int) -> int:
        """The MTP layer of draft step j (1-based expansions after the extend's row): min(j, D-1)."""
        return min(j, self.model.cfg.num_nextn_predict_layers - 1)

    def draft(self, root: torch.Tensor, g: torch.Tensor, n_rows: list[int], rows: Rows, cache: LatentCache,
              sb: SamplingBatch, shape: DraftShape, depth: list[int] | None = None,
              floor: list[float | None] | None = None) -> Draft:
        """root [B] last committed tokens (not yet verified); g [B, D] MTP output of each request's last committed
        row (it predicts the root's child); n_rows[b] committed layer-0 MTP rows (row i at slot rows.maps[b, i]);
        expanded draft node e of request b writes its row at row n_rows[b] + e (the next extend overwrites it).
        shape: the chain or tree to build (rank 0's choice, from the step plan); with shape.gate, each request's
        depth and floor (Decode's). A sampled row's drafting takes shape.draft_draws uniforms whatever it drafts,
        so the uniforms of its acceptance sit where they would at the full shape."""
        if shape.topk == 1:
            gate = ChainGate(shape.gate, depth, floor, sb.greedy.tolist()) if shape.gate is not None else None
            out = self._draft_chain(root, g, n_rows, rows, cache, sb, min(shape.k, shape.budget), gate)
        else:
            gate = TreeGate(shape.gate, depth, floor, sb, root.device) if shape.gate is not None else None
            out = self._draft_tree(root, g, n_rows, rows, cache, sb, shape, gate)
        rest = shape.draft_draws(self.model.cfg.vocab_size) - sb.used
        if sb.any_sampled and rest:
            sb.uniform((rest,))
        return out

    def _draft_tree(self, root: torch.Tensor, g: torch.Tensor, n_rows: list[int], rows: Rows, cache: LatentCache,
                    sb: SamplingBatch, shape: DraftShape, gate: TreeGate | None) -> Draft:
        k, w = shape.k, shape.topk
        b = root.shape[0]
        dev = root.device
        q_rows: list[torch.Tensor] = []
        tokens, lq, top = self._children(self.model.logits(g), sb, w, q_rows, ranked=gate is not None)
        self._mark_head()
        cells = gate.cells(top, w) if gate is not None else None
        cand_t = [tokens]
        cand_p = [torch.full((b, w), -1, dtype=torch.long, device=dev)]
        cand_s = [monotone_scores(lq if gate is None else gate.score(lq, cells[1]), torch.zeros(b, device=dev))]
        cand_d = [torch.ones(b, w, dtype=torch.long, device=dev)]  # depth of each candidate
        cand_c = [cells[0]] if gate is not None else []
        exp_row = torch.full((b, w), -1, dtype=torch.long, device=dev)  # grows with the candidates
        level_start, level_n = 0, w
        hid = g[:, None, :].expand(b, w, g.shape[-1])  # [B, level_n, D]: hidden each candidate is paired with
        anc = torch.zeros(b, w, 0, dtype=torch.long, device=dev)  # ancestor draft slots per candidate
        n_t = torch.tensor(n_rows, device=dev)
        levels = 1
        for j in range(1, k):
            f = min(w, level_n)
            lvl_score = torch.cat(cand_s, 1)[:, level_start:level_start + level_n]
            pick = lvl_score.topk(f, dim=-1).indices.sort(-1).values  # [B, F] frontier within the level
            if gate is not None:
                fs = lvl_score.gather(1, pick)
                if not gate.go((fs >= gate.log_floor[:, None]) & (gate.depth[:, None] > j), fs.exp()):
                    break
            levels += 1
            front = level_start + pick  # candidate indices
            all_t = torch.cat(cand_t, 1)
            x = all_t.gather(1, front)  # [B, F]
            h = hid.gather(1, pick[..., None].expand(b, f, hid.shape[-1]))
            e_idx = (j - 1) * w + torch.arange(f, device=dev)  # expansion ids of this level
            own = rows.maps.gather(1, n_t[:, None] + e_idx[None, :])  # [B, F] slots
            a = anc.gather(1, pick[..., None].expand(b, f, anc.shape[-1]))
            path_slots = torch.cat([a, own[..., None]], dim=-1)  # [B, F, j] every expanded ancestor, then itself
            layer = self._layer(j)
            same = j - self._first_step(layer)  # earlier steps that ran this layer (the last ancestors)
            committed = [max(n - layer, 0) for n in n_rows]
            meta = self._node_meta(committed, rows.maps, path_slots[..., j - 1 - same:].reshape(b * f, same + 1))
            pos = (n_t[:, None] + j).expand(b, f).reshape(-1)
            out = self.model.mtp_forward(layer, x.reshape(-1), h.reshape(b * f, -1), pos, meta, cache)
            exp_row = exp_row.scatter(1, front, 1 + e_idx[None, :].expand(b, f))  # q row of its children
            child_t, child_lq, top = self._children(self.model.logits(out), sb, w, q_rows, rows_per_request=f,
                                                    ranked=gate is not None)
            cells = gate.cells(top, w) if gate is not None else None
            raw = child_lq if gate is None else gate.score(child_lq, cells[1])
            child_t, raw = child_t.view(b, f * w), raw.view(b, f, w)
            parent_score = torch.cat(cand_s, 1).gather(1, front)  # [B, F]
            child_s = monotone_scores(parent_score[..., None] + raw, parent_score).reshape(b, f * w)
            level_start = sum(t.shape[1] for t in cand_t)
            level_n = f * w
            cand_t.append(child_t)
            cand_p.append(front.repeat_interleave(w, dim=1))
            cand_s.append(child_s)
            cand_d.append(torch.full((b, f * w), j + 1, dtype=torch.long, device=dev))
            if gate is not None:
                cand_c.append(cells[0])
            exp_row = torch.cat([exp_row, torch.full((b, f * w), -1, dtype=torch.long, device=dev)], 1)
            hid = out.view(b, f, -1).repeat_interleave(w, dim=1)
            anc = path_slots.repeat_interleave(w, dim=1)
        cands = Candidates(torch.cat(cand_t, 1), torch.cat(cand_p, 1), torch.cat(cand_s, 1), exp_row)
        q = torch.stack(q_rows, 1) if q_rows else None
        if gate is None:
            idx = rank_candidates(cands, shape.budget)
            return Draft(tree_of(root, cands, idx, levels, w), q, steps=levels - 1)
        keep = (cands.score >= gate.log_floor[:, None]) & (torch.cat(cand_d, 1) <= gate.depth[:, None])
        idx = rank_candidates(cands, shape.budget, keep)
        at = idx.clamp(min=0)
        real = idx >= 0
        parent = torch.where(real, cands.parent.gather(1, at), -1)
        code = torch.where(real, torch.cat(cand_c, 1).gather(1, at), -1)
        host = torch.cat([idx, parent, code], 1).tolist()  # the step's one read of the tree
        m = idx.shape[1]
        sizes, codes, parents = [], [], []
        for row in host:
            ids, par, cod = row[:m], row[m:2 * m], row[2 * m:]
            live = sum(i >= 0 for i in ids)
            node = {c: i + 1 for i, c in enumerate(ids[:live])}
            sizes.append(1 + live)
            codes.append(cod[:live])
            parents.append([node.get(c, 0) for c in par[:live]])
        idx = idx[:, :max(sizes) - 1]
        return self._ragged(tree_of(root, cands, idx, levels, w), q, False, levels - 1, sizes, codes, parents)

    def _draft_chain(self, root: torch.Tensor, g: torch.Tensor, n_rows: list[int], rows: Rows, cache: LatentCache,
                     sb: SamplingBatch, k: int, gate: ChainGate | None) -> Draft:
        """topk=1: each of k steps drafts one token from the previous step's output. A step's draft row goes right
        after its layer's committed rows and earlier draft rows (the next extend overwrites them), so attention
        is causal. Gated: request b's chain ends at its depth or at the first node whose path acceptance falls
        below its floor, and a step runs only while the chains it extends pay for it (draft_gate.ChainGate, on
        the host: one read of the step's two best log-probabilities a request); its MTP forward and logits run
        over the chains still going on alone (the others' rows get placeholder logits, which keeps every row's
        draws where they would be; their children are never kept)."""
        q_rows: list[torch.Tensor] = []
        ranked = gate is not None
        tok, _, top = self._children(self.model.logits(g), sb, 1, q_rows, ranked=ranked)
        self._mark_head()
        drafts = [tok]
        if gate is not None:
            gate.add(top[:, 0].tolist())
        dev = root.device
        n_t = torch.tensor(n_rows, device=dev)
        ones = torch.ones(len(n_rows), 1, dtype=torch.bool, device=dev)
        for j in range(1, k):
            if gate is not None and not gate.go():
                break
            layer = self._layer(j)
            ctx = [max(n - layer, 0) + j - self._first_step(layer) for n in n_rows]  # + its earlier draft rows
            live = None if gate is None or all(gate.live) else [b for b, on in enumerate(gate.live) if on]
            if live is None:
                meta = rows.meta(ctx, [1] * len(n_rows), ones)
                g = self.model.mtp_forward(layer, tok[:, 0], g, n_t + j, meta, cache)
                logits = self.model.logits(g)
            else:  # [L] live chains of the B
                idx = torch.tensor(live, device=dev)
                meta = rows.meta([ctx[b] for b in live], [1] * len(live), ones[:len(live)], keep=live)
                g_live = self.model.mtp_forward(layer, tok[idx, 0], g[idx], (n_t + j)[idx], meta, cache)
                g = g.index_copy(0, idx, g_live)
                live_logits = self.model.logits(g_live)
                logits = live_logits.new_zeros(len(n_rows), live_logits.shape[-1]).index_copy(0, idx, live_logits)
            tok, _, top = self._children(logits, sb, 1, q_rows, ranked=ranked)
            drafts.append(tok)
            if gate is not None:
                gate.add(top[:, 0].tolist())
        q = torch.stack(q_rows, 1) if q_rows else None
        steps = len(drafts) - 1
        if gate is None:
            return Draft(chain_tree(root, torch.cat(drafts, 1)), q, chain=True, steps=steps)
        lens = gate.lens
        m = max(lens)
        ragged = torch.tensor(lens, device=dev) if min(lens) < m else None
        tree = chain_tree(root, torch.cat(drafts, 1)[:, :m], ragged)
        return self._ragged(tree, q, True, steps, [1 + x for x in lens], gate.codes, [list(range(x)) for x in lens])

    @staticmethod
    def _ragged(tree: TokenTree, q: torch.Tensor | None, chain: bool, steps: int, sizes: list[int],
                codes: list[list[int]], parents: list[list[int]]) -> Draft:
        """A gated Draft, with the packing index of its real nodes when some request is padded."""
        n = tree.tokens.shape[1]
        index = None
        if min(sizes) < n:
            index = torch.tensor([b * n + i for b, s in enumerate(sizes) for i in range(s)],
                                 device=tree.tokens.device)
        return Draft(tree, q, chain, steps, sizes, codes, parents, index)

    def _children(self, logits: torch.Tensor, sb: SamplingBatch, w: int, q_rows: list[torch.Tensor],
                  rows_per_request: int = 1, ranked: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """logits [B * r, V] -> children ids [B, r * w] in draw order, their log q [B, r * w], and (ranked) each
        distribution's w + 1 best log-probabilities [B, r, w + 1] (-inf past the vocabulary; else None), from which
        a gate reads its children's confidence: the rank-th score, never the drawn token's own (gumbel_topk), so
        that what a sampled row drafts never depends on which token it drew.
        Greedy rows take the top-w of the raw distribution; sampled rows draw w without replacement from the
        processed draft distribution q (whose rows are appended to q_rows, one [B, V] per r)."""
        b = logits.shape[0] // rows_per_request
        v = logits.shape[-1]
        n = min(w + 1 if ranked else w, v)
        lq, ids = logits.log_softmax(-1).topk(n, dim=-1)
        top = lq
        ids, lq = ids[:, :w], lq[:, :w]
        if sb.any_sampled:
            qp = sb.probs(logits, rows_per_request)
            logq_s = qp.log()
            u = sb.uniform((rows_per_request, v)).reshape(b * rows_per_request, -1)
            ids_s, lq_s = gumbel_topk(logq_s, u, w)
            g = sb.greedy.repeat_interleave(rows_per_request)[:, None]
            ids, lq = torch.where(g, ids, ids_s), torch.where(g, lq, lq_s)
            if ranked:
                top = torch.where(g, top, logq_s.topk(n, dim=-1).values)
            q_rows.extend(qp.view(b, rows_per_request, -1).unbind(1))
        if ranked:
            top = F.pad(top, (0, w + 1 - n), value=float("-inf")).view(b, rows_per_request, w + 1)
        return ids.reshape(b, -1), lq.reshape(b, -1), top if ranked else None

    @staticmethod
    def _first_step(layer: int) -> int:
        """The first draft step (1-based) that runs `layer`; later steps rerun the last layer."""
        return max(layer, 1)

    @staticmethod
    def _node_meta(committed: list[int], maps: torch.Tensor, path_slots: torch.Tensor) -> AttnMeta:
        """Each frontier node is its own sequence: the layer's committed rows, the draft rows of its ancestors
        that ran the same layer, itself (path_slots [B*F, m], the node's own slot last)."""
        bf, m = path_slots.shape
        f = bf // len(committed)
        dev = maps.device
        width = max(committed) + m
        bt = maps[:, :width].repeat_interleave(f, dim=0).clone()
        cols = torch.tensor(committed, device=dev).repeat_interleave(f)[:, None] + torch.arange(m, device=dev)
        bt.scatter_(1, cols, path_slots)
        ctx = [c + m - 1 for c in committed for _ in range(f)]
        return AttnMeta.build(bt, ctx, [1] * bf, torch.ones(bf, 1, dtype=torch.bool, device=dev))
