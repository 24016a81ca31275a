"""The cost model of a decode step, measured by the engine itself (issue 18): running estimates, per batch-size
bucket, of what a step's verify phase costs as a function of the tokens it verifies, of what its drafting costs as
a function of the draft steps it runs, and of the throughput drafting steps reach; what catching up the MTP rows
that plain steps left costs a row; and the calibration of the MTP's confidence into acceptance. Rank 0 keeps it,
fed from StepClock's phase timings (no sync of its own) and from each verify step's outcome; draft_policy.py
decides from it.

A draft node's confidence is its margin: the draft distribution's log-probability of the node minus that of the
next-ranked token (for sampled rows, of the processed distribution, ranked as gumbel_topk ranks draws, so that it
never depends on which token was drawn: a gate on the drawn token's own probability would bias the samples). On
the bundled model the margin predicts acceptance far better than the top probability does (log-loss 0.39 vs 0.46,
against 0.55 for a constant): the MTP is underconfident, so its probabilities are calibrated from what verification
accepts, per margin bin and sibling rank.
"""

from __future__ import annotations

from dataclasses import dataclass

MARGIN_EDGES = (0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)  # nats; bin i holds margins up to edge i
NUM_BINS = len(MARGIN_EDGES) + 1
RANKS = 4  # sibling ranks calibrated apart; later siblings share the last
MODES = ("greedy", "sampled")
BUCKETS = ("1", "2", "3-4", "5-8", "9-16", "17-32", "33-64", "65+")
CALIBRATION_SIZE = len(MODES) * RANKS * NUM_BINS


def bucket(batch: int) -> int:
    """The index in BUCKETS of a batch of `batch` requests (>= 1)."""
    return min((batch - 1).bit_length(), len(BUCKETS) - 1)


def gate_code(rank: int, margin_bin: int) -> int:
    """A draft node's calibration cell within its mode: its sibling rank (capped) and margin bin."""
    return min(rank, RANKS - 1) * NUM_BINS + margin_bin


class LinearFit:
    """y ~ a + b x by exponentially weighted least squares: each observation discounts the earlier ones by `decay`,
    so the fit follows a machine whose speed drifts. The slope is 0 (and never negative) until x has varied."""

    def __init__(self, decay: float):
        self.decay = decay
        self.n = 0  # observations, undiscounted
        self.w = self.x = self.y = self.xx = self.xy = 0.0

    def add(self, x: float, y: float) -> None:
        d = self.decay
        self.n += 1
        self.w, self.x, self.y = d * self.w + 1, d * self.x + x, d * self.y + y
        self.xx, self.xy = d * self.xx + x * x, d * self.xy + x * y

    @property
    def seen(self) -> bool:
        return self.w > 0

    def line(self) -> tuple[float, float]:
        """(intercept, slope) of the fit; (0, 0) before any observation."""
        if not self.w:
            return 0.0, 0.0
        mx, my = self.x / self.w, self.y / self.w
        vx = self.xx / self.w - mx * mx
        slope = max((self.xy / self.w - mx * my) / vx, 0.0) if vx > 1e-9 * max(1.0, mx * mx) else 0.0
        return my - slope * mx, slope

    def ratio(self) -> float:
        """The slope of the fit through the origin (y ~ b x); 0 before any observation."""
        return self.xy / self.xx if self.xx else 0.0

    def at(self, x: float) -> float:
        a, b = self.line()
        return a + b * x


@dataclass(frozen=True)
class Estimates:
    """One bucket's current estimates, in seconds: plain_step, a step verifying one token per request at the
    bucket's batch (from its plain steps once it ran any, else from the verify line); per_token, each further token
    verified; draft_step, each MTP forward of the propose phase after its first head (a fit through the origin);
    throughput, the tokens per second of recent drafting steps (propose, verify and the MTP extend); catch_up, each
    MTP row that a plain step leaves to the next drafting step's catch-up (any bucket's)."""

    plain_step: float
    per_token: float
    draft_step: float
    throughput: float
    catch_up: float = 0.0


class CostModel:
    """Per batch-size bucket: verify seconds against tokens verified (a plain step verifies one a request; a linear
    fit) and draft seconds against the MTP forwards run after the first head (through the origin: the gate keeps a
    batch's draft steps nearly constant, so an intercept and a slope were not both identified, and the slope,
    clamped at 0 or lost in noise, read 0 ms a draft step at batch 1, 4 and 16 where each costs 1-3 ms: the gate
    then took another draft step for free), and the emitted tokens and seconds of drafting steps (exponentially
    weighted sums); the fits forget at `decay` per step of their bucket (the throughput at plain steps too). Plain
    steps also have a fit of their own, seconds against batch: once a bucket ran one, its plain step is read there,
    not from the verify line (at batch 32 that line, drawn through drafting steps of ~100 tokens, put a plain step
    at 31 ms where they took 37, and sent the bucket plain while drafting yielded 30% more). One fit over every
    bucket: catch-up seconds against MTP rows caught up."""

    def __init__(self, decay: float = 0.95):
        self.decay = decay
        self.verify = [LinearFit(decay) for _ in BUCKETS]
        self.plain = [LinearFit(decay) for _ in BUCKETS]
        self.draft = [LinearFit(decay) for _ in BUCKETS]
        self.catch_up = LinearFit(decay)
        self.tokens = [0.0] * len(BUCKETS)
        self.seconds = [0.0] * len(BUCKETS)

    def add_plain(self, batch: int, seconds: float) -> None:
        """A step without drafts: `batch` tokens verified (one a request). The drafting steps' throughput forgets
        here too, so that through a stretch of plain steps the explore steps' rate takes over from the rate drafting
        had before it (which would otherwise keep the bucket plain long after drafting pays again)."""
        i = bucket(batch)
        self.verify[i].add(batch, seconds)
        self.plain[i].add(batch, seconds)
        self.tokens[i] *= self.decay
        self.seconds[i] *= self.decay

    def add_drafting(self, batch: int, tokens: int, steps: int, emitted: int, draft_s: float, verify_s: float,
                     extend_s: float = 0.0, head_s: float = 0.0) -> None:
        """A drafting step: the first head's draft in head_s seconds and `steps` MTP forwards after it in draft_s
        (the propose phase), `tokens` verified over the batch (roots included) in verify_s, `emitted` tokens
        committed and their MTP rows extended in extend_s. The first head runs whenever a step drafts, so only the
        steps after it enter the draft fit (a head is a logits pass, cheaper than an MTP forward: counted as one, it
        made each further draft step look 35% cheaper at batch 16). The extend follows what was accepted, not what
        was drafted, so it counts in the throughput only: in the draft fit it would credit acceptance's cost to the
        draft steps."""
        i = bucket(batch)
        self.verify[i].add(tokens, verify_s)
        self.draft[i].add(steps, draft_s)
        self.tokens[i] = self.decay * self.tokens[i] + emitted
        self.seconds[i] = self.decay * self.seconds[i] + head_s + draft_s + verify_s + extend_s

    def add_catch_up(self, rows: int, seconds: float) -> None:
        """A drafting step's catch-up: `rows` MTP rows that earlier plain steps left, extended in `seconds`."""
        self.catch_up.add(rows, seconds)

    def estimates(self, batch: int) -> Estimates:
        i = bucket(batch)
        _, per_token = self.verify[i].line()
        rate = self.tokens[i] / self.seconds[i] if self.seconds[i] else 0.0
        plain = self.plain[i] if self.plain[i].seen else self.verify[i]
        return Estimates(plain.at(batch), per_token, self.draft[i].ratio(), rate, self.catch_up.line()[1])


class Calibration:
    """What verification accepts of a draft node whose parent it accepted, per mode (greedy or sampled row),
    sibling rank and margin bin: decayed counts, each cell's estimate shrunk towards its mode's mean by one
    observation's weight (so a cell not yet seen reads the mean)."""

    def __init__(self, decay: float = 0.998):
        self.decay = decay
        self.seen = [0.0] * CALIBRATION_SIZE
        self.accepted = [0.0] * CALIBRATION_SIZE

    def add(self, outcomes: list[tuple[int, int, bool]]) -> None:
        """One verify step's outcomes: (mode, gate code, accepted) of each node whose parent was accepted."""
        d = self.decay
        self.seen = [d * x for x in self.seen]
        self.accepted = [d * x for x in self.accepted]
        for mode, code, ok in outcomes:
            i = mode * RANKS * NUM_BINS + code
            self.seen[i] += 1
            self.accepted[i] += ok

    def mean(self, mode: int | None = None) -> float:
        """Acceptance over every cell (of one mode); 0.5 before any outcome."""
        cells = range(CALIBRATION_SIZE) if mode is None else range(mode * RANKS * NUM_BINS,
                                                                    (mode + 1) * RANKS * NUM_BINS)
        seen = sum(self.seen[i] for i in cells)
        return (sum(self.accepted[i] for i in cells) + 0.5) / (seen + 1)

    def table(self) -> tuple[float, ...]:
        """Each cell's estimate, flattened [mode, rank, bin] (Gate.calibration)."""
        means = [self.mean(m) for m in range(len(MODES))]
        size = RANKS * NUM_BINS
        return tuple((self.accepted[i] + means[i // size]) / (self.seen[i] + 1) for i in range(CALIBRATION_SIZE))
