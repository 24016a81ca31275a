"""/metrics: Prometheus text with vLLM's names under a `specdec:` prefix, in a registry of the app's own (several
apps can live in one process).

The speculative-decoding counters follow vLLM's meaning: a draft is one verify step that checked MTP drafts (the
prefill verifies none), so the acceptance length over an interval is
1 + increase(spec_decode_num_accepted_tokens) / increase(spec_decode_num_drafts), and position d's acceptance rate
is increase(spec_decode_num_accepted_tokens_per_pos{position="d"}) / increase(spec_decode_num_drafts). Request
counters and histograms move when a request ends (finished, stopped or aborted), so they add up to the figures its
response carried: prompt_tokens counts each prompt once as usage does (not once per choice of an n > 1 request),
while the prefix-cache counters count every lookup (each choice looks its prompt up). With MTP, adaptive
speculation's choices and the cost model's estimates by batch size are read from the engine at each scrape
(DraftingCollector)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .loop import EngineStats, Job

PREFIX = "specdec:"
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                2.5, 5.0, 10.0)
E2E_BUCKETS = (0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 240.0, 480.0,
               960.0, 1920.0)


def spec_decode(jobs: list[Job], speculative: bool) -> dict:
    """The spec_decode object of finished requests (one, or a response's n choices) as responses carry it and the
    counters add up: tokens per main-model step, verify steps, draft tokens verified and accepted."""
    ms = [job.request.metrics for job in jobs]
    steps = sum(m.num_steps for m in ms)
    return {"mean_accepted_length": sum(m.num_generated for m in ms) / steps if steps else 0.0,
            "num_drafts": sum(m.num_decode_steps for m in ms) if speculative else 0,
            "num_draft_tokens": sum(m.num_drafted for m in ms), "num_accepted_tokens": sum(m.num_accepted for m in ms),
            "num_accepted_tokens_per_pos": [sum(c) for c in zip(*(m.accepted_per_position for m in ms))]}


class DraftingCollector:
    """Adaptive speculation by load (draft_policy.DraftingStats), per batch-size bucket `batch` (requests decoding
    together: "1", "2", "3-4", ...): the decode steps run there, the draft depth its last step chose (0: plain
    decoding) and its acceptance floor, the draft tokens verified per request and step, and the cost model's
    estimates (seconds: a plain step, each further verified token, each draft step's MTP forward after the first
    head, each MTP row caught up after plain steps; the tokens per second of drafting steps). Nothing for an engine
    without MTP."""

    def __init__(self, stats: Callable[[], EngineStats]):
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        d = self.stats().drafting
        if d is None:
            return
        g = lambda name, doc, labels=("batch",): GaugeMetricFamily(PREFIX + name, doc, labels=labels)
        adaptive = GaugeMetricFamily(PREFIX + "spec_decode_adaptive", "1: adaptive speculation, 0: a fixed shape",
                                     value=float(d.adaptive))
        acceptance = GaugeMetricFamily(PREFIX + "spec_decode_acceptance_estimate",
                                       "Recent acceptance of verified draft tokens (decayed)", value=d.acceptance)
        steps = CounterMetricFamily(PREFIX + "spec_decode_batch_steps", "Decode steps by batch size", labels=["batch"])
        depth = g("spec_decode_draft_depth", "Draft depth the last step of this batch size chose (0: plain)")
        floor = g("spec_decode_draft_floor", "Estimated path acceptance a draft token needed (last step; gated only)")
        budget = g("spec_decode_draft_tokens_per_request_step", "Draft tokens verified per request and decode step")
        cost = g("spec_decode_cost_seconds", "The cost model's estimates", ("batch", "part"))
        rate = g("spec_decode_drafting_throughput", "Tokens per second of recent drafting steps (estimate)")
        for b in d.buckets:
            steps.add_metric([b.batch], b.steps)
            depth.add_metric([b.batch], b.depth)
            if b.floor is not None:
                floor.add_metric([b.batch], b.floor)
            budget.add_metric([b.batch], b.drafted / b.request_steps)
            if (e := b.estimates) is not None:
                for part, x in (("plain_step", e.plain_step), ("per_verified_token", e.per_token),
                                ("per_draft_step", e.draft_step), ("per_caught_up_row", e.catch_up)):
                    cost.add_metric([b.batch, part], x)
                rate.add_metric([b.batch], e.throughput)
        yield from (adaptive, acceptance, steps, depth, floor, budget, cost, rate)


class ServerMetrics:
    def __init__(self, num_positions: int, speculative: bool, stats: Callable[[], EngineStats]):
        r = self.registry = CollectorRegistry()
        self.speculative = speculative

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=r)

        self.drafts = counter("spec_decode_num_drafts", "Verify steps that checked MTP drafts")
        self.draft_tokens = counter("spec_decode_num_draft_tokens", "Draft tokens verified")
        self.accepted = counter("spec_decode_num_accepted_tokens", "Draft tokens accepted")
        self.per_pos = counter("spec_decode_num_accepted_tokens_per_pos",
                               "Verify steps whose draft at this depth was accepted", ("position",))
        for d in range(num_positions):
            self.per_pos.labels(position=str(d))
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished requests (once per prompt, as usage "
                                     "counts them)")
        self.generation_tokens = counter("generation_tokens", "Tokens generated by finished requests")
        self.success = counter("request_success", "Finished requests by finish reason", ("finished_reason",))
        self.cache_queries = counter("prefix_cache_queries", "Prompt tokens of finished requests looked up in the "
                                     "prefix cache")
        self.cache_hits = counter("prefix_cache_hits", "Prompt tokens of finished requests found in the prefix cache")
        for g, doc, get in (("num_requests_running", "Requests prefilling or decoding", lambda: stats().running),
                            ("num_requests_waiting", "Requests waiting for a slot or KV blocks",
                             lambda: stats().waiting),
                            ("kv_cache_usage_perc", "Share of KV cache blocks in use (0 to 1)",
                             lambda: stats().kv_usage)):
            Gauge(PREFIX + g, doc, registry=r).set_function(get)
        r.register(DraftingCollector(stats))
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to first token", buckets=TTFT_BUCKETS,
                              registry=r)
        self.tpot = Histogram(PREFIX + "time_per_output_token_seconds", "Time per output token after the first",
                              buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "End-to-end request latency",
                             buckets=E2E_BUCKETS, registry=r)

    def observe(self, job: Job, count_prompt: bool = True) -> None:
        """A finished request (on the engine loop thread); count_prompt=False for choices 1.. of a prompt."""
        r = job.request
        s = spec_decode([job], self.speculative)
        self.drafts.inc(s["num_drafts"])
        self.draft_tokens.inc(s["num_draft_tokens"])
        self.accepted.inc(s["num_accepted_tokens"])
        for d, n in enumerate(s["num_accepted_tokens_per_pos"]):
            self.per_pos.labels(position=str(d)).inc(n)
        self.prompt_tokens.inc(len(r.prompt) if count_prompt else 0)
        self.generation_tokens.inc(len(r.generated))
        self.success.labels(finished_reason=r.finish_reason).inc()
        self.cache_queries.inc(len(r.prompt))
        self.cache_hits.inc(r.metrics.num_cached_tokens)
        self.e2e.observe(job.finished_at - job.submitted)
        if job.first_token is not None:
            self.ttft.observe(job.first_token - job.submitted)
            if len(r.generated) > 1:
                self.tpot.observe((job.finished_at - job.first_token) / (len(r.generated) - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
