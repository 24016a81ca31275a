"""The load generator behind `specdec bench serve`, modelled on `vllm bench serve`: streamed /v1/completions
requests sent at a Poisson request rate and/or under a concurrency cap, timed at the client; the server's
speculative-decoding counters read from /metrics before and after the run. `load_process` runs the clients in a
process of their own (as vLLM's benchmark is), so their parsing never takes the GIL from a server in this process.

Per request: TTFT (send to the first event with tokens), ITL (gaps between events with tokens: one event per verify
step, so with MTP one gap covers every token that step accepted), TPOT ((latency - TTFT) / (output tokens - 1)), and
end-to-end latency. Results are plain JSON-able dicts with vLLM's field names."""

from __future__ import annotations

import asyncio
import json
import math
import multiprocessing as mp
import random
import statistics
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

SPEC = "specdec:spec_decode_"


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the server's prefix cache held


async def _one(client: httpx.AsyncClient, url: str, body: dict) -> Result:
    r = Result()
    t0 = last = time.perf_counter()
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                r.error = f"HTTP {resp.status_code}: {_message(text)}"
                return r
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    r.ok = True
                    break
                event = json.loads(data)
                if "error" in event:
                    r.error = event["error"].get("message", "error")
                    break
                if event.get("usage"):
                    r.output_tokens = event["usage"]["completion_tokens"]
                    r.prompt_tokens = event["usage"]["prompt_tokens"]
                    r.cached_tokens = (event["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                if event.get("choices") and event["choices"][0].get("finish_reason") == "abort":
                    r.error = "aborted by the server"
                if event.get("choices") and event["choices"][0].get("token_ids"):
                    now = time.perf_counter()
                    if r.ttft == 0.0:
                        r.ttft = now - t0
                    else:
                        r.itl.append(now - last)
                    last = now
    except httpx.HTTPError as e:
        r.error = f"{type(e).__name__}: {e}"
    r.latency = time.perf_counter() - t0
    r.ok = r.ok and not r.error
    return r


def _message(text: str) -> str:
    try:
        return json.loads(text)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return text.strip().splitlines()[0] if text.strip() else "(empty body)"


async def _run(url: str, bodies: list[dict], request_rate: float, max_concurrency: int | None,
               seed: int) -> tuple[list[Result], float]:
    rng = random.Random(seed)
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    conns = max_concurrency or len(bodies)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=httpx.Limits(
            max_connections=conns, max_keepalive_connections=conns)) as client:
        async def send(body: dict) -> Result:
            if limit is None:
                return await _one(client, url, body)
            async with limit:
                return await _one(client, url, body)

        tasks = []
        t0 = time.perf_counter()
        for i, body in enumerate(bodies):
            if i and math.isfinite(request_rate):
                await asyncio.sleep(rng.expovariate(request_rate))  # Poisson arrivals
            tasks.append(asyncio.create_task(send(body)))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - t0


def run_load(url: str, bodies: list[dict], request_rate: float = math.inf, max_concurrency: int | None = None,
             seed: int = 0) -> tuple[list[Result], float]:
    """Send every body (streamed completions); (per-request results in order, wall seconds of the run)."""
    return asyncio.run(_run(url, bodies, request_rate, max_concurrency, seed))


@contextmanager
def load_process() -> Iterator[Callable[..., tuple[list[Result], float]]]:
    """run_load, called in one spawned process (this module's imports only: no torch) for the whole block, so the
    clients' Python never competes for the GIL with a server running in this process."""
    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
        yield lambda *args, **kwargs: ex.submit(run_load, *args, **kwargs).result()


def served_model(url: str) -> str:
    """The server's model name (GET /v1/models); ValueError when nothing answers there."""
    try:
        r = httpx.get(f"{url}/v1/models", timeout=10)
        r.raise_for_status()
        return r.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as e:
        raise ValueError(f"--base-url {url}: no OpenAI-compatible server answers there ({e})") from None


def spec_counters(url: str) -> dict[str, float]:
    """The speculative-decoding counters of /metrics: drafts, draft tokens, accepted tokens, accepted per position
    ({"per_pos": {d: n}}), generation tokens. Missing ones read 0 (a server without MTP)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out: dict = {"num_drafts": 0.0, "num_draft_tokens": 0.0, "num_accepted_tokens": 0.0, "per_pos": {},
                 "generation_tokens": 0.0}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == SPEC + "num_accepted_tokens_per_pos_total":
                out["per_pos"][int(s.labels["position"])] = s.value
            elif s.name.startswith(SPEC) and s.name.endswith("_total"):
                out[s.name[len(SPEC):-len("_total")]] = s.value
            elif s.name == "specdec:generation_tokens_total":
                out["generation_tokens"] = s.value
    return out


def _stats(xs: list[float], name: str) -> dict:
    ms = sorted(1e3 * x for x in xs)
    if not ms:
        return {f"mean_{name}_ms": None, f"median_{name}_ms": None, f"p99_{name}_ms": None}
    p99 = ms[min(len(ms) - 1, math.ceil(0.99 * len(ms)) - 1)]
    return {f"mean_{name}_ms": statistics.fmean(ms), f"median_{name}_ms": statistics.median(ms),
            f"p99_{name}_ms": p99}


def summarize(results: list[Result], duration: float, before: dict, after: dict) -> dict:
    """vLLM's bench serve fields, plus spec_decode from the /metrics difference: acceptance_length
    (1 + accepted / drafts), acceptance_rate (accepted / draft tokens), acceptance_rate_per_position[d]
    (steps whose depth-d draft was accepted / drafts)."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    d = {k: after[k] - before[k] for k in ("num_drafts", "num_draft_tokens", "num_accepted_tokens")}
    per_pos = [after["per_pos"].get(p, 0.0) - before["per_pos"].get(p, 0.0) for p in sorted(after["per_pos"])]
    drafts = d["num_drafts"]
    spec = {"num_drafts": int(drafts), "num_draft_tokens": int(d["num_draft_tokens"]),
            "num_accepted_tokens": int(d["num_accepted_tokens"]),
            "acceptance_length": 1 + d["num_accepted_tokens"] / drafts if drafts else None,
            "acceptance_rate": d["num_accepted_tokens"] / d["num_draft_tokens"] if d["num_draft_tokens"] else None,
            "acceptance_rate_per_position": [n / drafts for n in per_pos] if drafts else []}
    errors = sorted({r.error for r in results if not r.ok})
    return {
        "completed": len(ok), "failed": len(results) - len(ok), "errors": errors[:5], "duration": duration,
        "total_input_tokens": sum(r.prompt_tokens for r in ok), "total_output_tokens": out_tokens,
        "total_cached_tokens": sum(r.cached_tokens for r in ok),
        "server_generation_tokens": int(after["generation_tokens"] - before["generation_tokens"]),
        "request_throughput": len(ok) / duration if duration else 0.0,
        "output_throughput": out_tokens / duration if duration else 0.0,
        **_stats([r.ttft for r in ok], "ttft"), **_stats(tpot, "tpot"),
        **_stats([x for r in ok for x in r.itl], "itl"), **_stats([r.latency for r in ok], "e2el"),
        "spec_decode": spec,
    }
