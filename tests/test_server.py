"""`specdec serve` over real HTTP on 127.0.0.1: the official openai client, outputs equal to each request run alone
under continuous batching, a pool that queues, aborted requests freeing their blocks, every kind of bad request a
4xx with an OpenAI-style body, /metrics adding up, tensor parallelism, and SIGTERM. Tiny agreeable checkpoints with
a byte-level BPE tokenizer keep it fast."""

from __future__ import annotations

import json
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch
from cli_errors import one_line_error
from models import VOCAB, agreeable_checkpoint
from serving import BOS, TREE, check_error, events, healthy, idle, scrape, serving, wait_for

from specdec import LLM, SamplingParams
from specdec.server.app import create_app
from specdec.server.background import BackgroundServer

# --- the openai client -----------------------------------------------------------------------------------------

def test_openai_client_completions_and_chat(url: str, alone: LLM, ckpt: Path) -> None:
    c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    assert [m.id for m in c.models.list().data] == ["tiny"]
    prompt = "def parse(text):\n"
    want = alone.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    extra = {"ignore_eos": True}
    r = c.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, extra_body=extra)
    choice = r.choices[0]
    assert choice.text == want.text and choice.token_ids == want.token_ids and choice.finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens == len(want.prompt_token_ids)
    spec = r.spec_decode
    assert spec["num_accepted_tokens"] == want.metrics.num_accepted
    assert spec["mean_accepted_length"] == pytest.approx(want.metrics.mean_accepted_length)

    chunks = list(c.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True}, extra_body=extra))
    steps = [ch for ch in chunks if ch.choices]
    assert "".join(ch.choices[0].text for ch in steps) == want.text
    assert [t for ch in steps for t in ch.choices[0].token_ids] == want.token_ids
    assert len(steps) == want.metrics.num_steps  # one event per verify step (the prefill's first token included)
    assert steps[-1].choices[0].finish_reason == "length" and steps[-1].spec_decode == spec
    assert all(ch.choices[0].finish_reason is None for ch in steps[:-1])
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].spec_decode == spec

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Write a loop."}]
    text = f"{BOS}Be brief.<｜User｜>Write a loop.<｜Assistant｜>"
    ids = alone.tokenizer.encode(text, add_special_tokens=False).ids
    assert ids[0] == alone.config.bos_token_id
    want = alone.generate([ids], SamplingParams(max_tokens=10, temperature=0))[0]
    r = c.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(ids) and r.choices[0].token_ids == want.token_ids
    chunks = list(c.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=10,
                                            temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == want.finish_reason


def test_n_choices_are_requests_of_their_own(url: str, alone: LLM) -> None:
    """n=3: choice i is what a request alone generates, seeded with seed + i (vLLM's rule); usage counts the prompt
    once; a stream tags each event with its choice, and the usage chunk comes after every choice ended."""
    c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    prompt, extra = [5, 9, 31, 7], {"ignore_eos": True}
    wants = [alone.generate([prompt], SamplingParams(max_tokens=10, temperature=0.9, seed=11 + i,
                                                     ignore_eos=True))[0] for i in range(3)]
    assert len({tuple(w.token_ids) for w in wants}) > 1  # the seeds give different choices
    r = c.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0.9, seed=11, n=3,
                             extra_body=extra)
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert [ch.token_ids for ch in r.choices] == [w.token_ids for w in wants]
    assert r.usage.prompt_tokens == 4 and r.usage.completion_tokens == 30
    assert r.spec_decode["num_accepted_tokens"] == sum(w.metrics.num_accepted for w in wants)
    assert r.spec_decode["num_drafts"] == sum(w.metrics.num_decode_steps for w in wants)

    chunks = list(c.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0.9, seed=11, n=3,
                                       stream=True, stream_options={"include_usage": True}, extra_body=extra))
    got: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for ch in chunks[:-1]:
        got[ch.choices[0].index] += ch.choices[0].token_ids
    assert list(got.values()) == [w.token_ids for w in wants]
    finishes = [ch.choices[0].index for ch in chunks[:-1] if ch.choices[0].finish_reason]
    assert sorted(finishes) == [0, 1, 2] and not chunks[-1].choices
    assert chunks[-1].usage.completion_tokens == 30

    # choices 1.. start once choice 0 has prefilled the prompt, so they take its full blocks from the cache
    hits = scrape(url)["specdec:prefix_cache_hits_total"]
    long = c.completions.create(model="tiny", prompt=list(range(2, 152)), max_tokens=4, n=3)
    assert len(long.choices) == 3 and scrape(url)["specdec:prefix_cache_hits_total"] - hits == 2 * 128

    chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                     temperature=0, n=2)
    assert [ch.index for ch in chat.choices] == [0, 1]
    assert chat.choices[0].message.content == chat.choices[1].message.content  # greedy: the same twice


def test_logprobs_over_http(url: str, alone: LLM) -> None:
    """Completions' legacy logprobs and chat's logprobs / top_logprobs carry what LLM.generate returns, streamed
    and not, through the openai client."""
    c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    prompt = "def parse(text):\n"
    want = alone.generate([prompt], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=2))[0]
    token_lps = [d[t] for t, d in zip(want.token_ids, want.logprobs)]
    r = c.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0, logprobs=2,
                             extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(token_lps, abs=1e-5)
    assert lp.tokens == [alone.tokenizer.decode([t]) for t in want.token_ids]
    assert all(len(top) <= 2 for top in lp.top_logprobs) and lp.text_offset[0] == 0
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:j]) for j in range(10)]
    chunks = list(c.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0, logprobs=2,
                                       stream=True, extra_body={"ignore_eos": True}))
    streamed = [v for ch in chunks for v in ch.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(token_lps, abs=1e-5)
    assert [o for ch in chunks for o in ch.choices[0].logprobs.text_offset] == lp.text_offset

    messages = [{"role": "user", "content": "Write a loop."}]
    ids = alone.tokenizer.encode(f"{BOS}<｜User｜>Write a loop.<｜Assistant｜>", add_special_tokens=False).ids
    want = alone.generate([ids], SamplingParams(max_tokens=8, temperature=0, logprobs=3))[0]
    r = c.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0, logprobs=True,
                                  top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert [x.logprob for x in content] == pytest.approx([d[t] for t, d in zip(want.token_ids, want.logprobs)],
                                                         abs=1e-5)
    for x, d in zip(content, want.logprobs):
        assert len(x.top_logprobs) == 3 and x.top_logprobs[0].logprob == pytest.approx(max(d.values()), abs=1e-5)
        assert x.bytes == list(x.token.encode())
    assert c.chat.completions.create(model="tiny", messages=messages, max_tokens=2).choices[0].logprobs is None


def test_echo_scores_the_prompt(url: str, alone: LLM) -> None:
    """echo with logprobs (how evaluation harnesses score a continuation): the prompt's text and its tokens'
    logprobs come first, the first prompt token's being None."""
    prompt = "def parse(text):\n    return"
    ids = alone._encode(prompt, 0)  # as the server encodes it (BOS first)
    want = alone.generate([ids], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True, logprobs=1,
                                                prompt_logprobs=1))[0]
    c = openai.OpenAI(base_url=f"{url}/v1", api_key="unused")
    r = c.completions.create(model="tiny", prompt=prompt, max_tokens=1, temperature=0, logprobs=1, echo=True,
                             extra_body={"ignore_eos": True})
    ch = r.choices[0]
    assert ch.text.startswith(prompt) and len(ch.text) > len(prompt) and ch.token_ids == want.token_ids
    lp = ch.logprobs
    assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    expect = [d[t] for t, d in zip(ids[1:], want.prompt_logprobs[1:])] + [want.logprobs[0][want.token_ids[0]]]
    assert lp.token_logprobs[1:] == pytest.approx(expect, abs=1e-5)
    plain = c.completions.create(model="tiny", prompt=prompt, max_tokens=1, temperature=0, echo=True)
    assert plain.choices[0].text.startswith(prompt) and plain.choices[0].logprobs is None
    r = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "echo": True, "stream": True}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "echo"


def test_penalties_over_http(url: str, alone: LLM) -> None:
    body = {"prompt": [9] * 20, "max_tokens": 12, "temperature": 0, "ignore_eos": True, "presence_penalty": 1,
            "frequency_penalty": 0.5, "repetition_penalty": 1.5}
    want = alone.generate([[9] * 20], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                     presence_penalty=1.0, frequency_penalty=0.5,
                                                     repetition_penalty=1.5))[0]
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == want.token_ids, r.text
    banned = want.token_ids[0]
    r = httpx.post(f"{url}/v1/completions", json=body | {"logit_bias": {str(banned): -100}, "min_tokens": 3},
                   timeout=30)
    assert r.status_code == 200 and banned not in r.json()["choices"][0]["token_ids"], r.text


def test_without_a_chat_template_the_plain_one_is_used(ckpt: Path, alone: LLM, tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    shutil.copytree(ckpt, plain, ignore=shutil.ignore_patterns("tokenizer_config.json"))
    with serving(plain) as u:
        r = httpx.post(f"{u}/v1/chat/completions", timeout=30, json={
            "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
            "max_tokens": 5, "temperature": 0})
    ids = alone.tokenizer.encode(f"{BOS}user: a\nb\nassistant:", add_special_tokens=False).ids
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(ids), r.text
    assert r.json()["choices"][0]["token_ids"] == alone.generate([ids], SamplingParams(max_tokens=5,
                                                                                       temperature=0))[0].token_ids


# --- continuous batching ---------------------------------------------------------------------------------------

def _greedy(seed: int, n: int, prompt_len: tuple[int, int], max_tokens: tuple[int, int]) -> list[tuple]:
    """n greedy requests (prompt ids, SamplingParams, request body) of random lengths."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = [rng.randrange(2, VOCAB) for _ in range(rng.randint(*prompt_len))]
        sp = SamplingParams(max_tokens=rng.randint(*max_tokens), temperature=0, ignore_eos=True)
        out.append((p, sp, {"prompt": p, "max_tokens": sp.max_tokens, "temperature": 0, "ignore_eos": True}))
    return out


def _concurrently(url: str, reqs: list[tuple], alone: LLM, seed: int, spread_s: float = 0.4) -> dict[str, float]:
    """Send each request from its own thread after a random delay, streams and plain requests alternating; check
    each one's tokens equal its run alone. Returns the most requests /metrics saw running and waiting at once."""
    rng = random.Random(seed)
    delays = [rng.uniform(0, spread_s) for _ in reqs]
    peak, stop = {"running": 0.0, "waiting": 0.0}, threading.Event()

    def watch() -> None:
        while not stop.is_set():
            m = scrape(url)
            for k in peak:
                peak[k] = max(peak[k], m[f"specdec:num_requests_{k}"])
            time.sleep(0.02)

    def one(i: int) -> list[int]:
        time.sleep(delays[i])
        body = reqs[i][2]
        with httpx.Client(timeout=60) as client:
            if i % 2:
                return [t for e in events(client, url, body) for t in e["choices"][0]["token_ids"]]
            r = client.post(f"{url}/v1/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["token_ids"]

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(len(reqs)) as ex:
            got = list(ex.map(one, range(len(reqs))))
    finally:
        stop.set()
        watcher.join()
    for i, ((p, sp, _), toks) in enumerate(zip(reqs, got)):
        assert toks == alone.generate([p], sp)[0].token_ids, f"seed={seed} request {i}"
    wait_for(lambda: idle(url), "the pool to empty")
    return peak


def test_concurrent_greedy_equals_each_request_alone(url: str, alone: LLM, seed: int) -> None:
    """16 requests of different lengths arriving at different times, batched together."""
    peak = _concurrently(url, _greedy(seed, 16, (1, 60), (1, 60)), alone, seed)
    assert peak["running"] >= 2, f"seed={seed}: requests never ran together ({peak})"


def test_seeded_sampling_is_reproducible(url: str, alone: LLM, seed: int) -> None:
    rng = random.Random(seed)
    reqs = []
    for i in range(8):
        p = [rng.randrange(2, VOCAB) for _ in range(rng.randint(1, 30))]
        sp = SamplingParams(max_tokens=30, temperature=0.9, top_p=0.95, top_k=50, seed=seed + i, ignore_eos=True)
        reqs.append((p, sp, {"prompt": p, "max_tokens": 30, "temperature": 0.9, "top_p": 0.95, "top_k": 50,
                             "seed": sp.seed, "ignore_eos": True}))
    _concurrently(url, reqs, alone, seed)


def test_a_small_pool_queues_and_every_request_finishes(ckpt: Path, alone: LLM, seed: int) -> None:
    """4 blocks of 64 rows for 8 requests of up to ~150 rows: they wait for blocks (and get preempted)."""
    with serving(ckpt, kv_cache_tokens=256) as u:
        peak = _concurrently(u, _greedy(seed, 8, (10, 40), (40, 100)), alone, seed, spread_s=0.05)
        assert peak["waiting"] >= 1, f"seed={seed}: no request ever waited for the pool ({peak})"
        assert scrape(u)["specdec:request_success_total{finished_reason=length}"] == 8


def test_disconnects_abort_and_free_their_blocks(ckpt: Path) -> None:
    with serving(ckpt) as u, httpx.Client(timeout=60) as client:
        assert idle(u)
        body = {"prompt": [5, 6, 7], "max_tokens": 2000, "ignore_eos": True, "stream": True}
        with client.stream("POST", f"{u}/v1/completions", json=body) as r:
            lines = (ln for ln in r.iter_lines() if ln)
            for _ in range(3):
                assert next(lines).startswith("data: ")
            assert scrape(u)["specdec:kv_cache_usage_perc"] > 0
        # the stream is closed mid-way: its request is aborted and its blocks return at once
        wait_for(lambda: idle(u), "the aborted stream's blocks")
        with pytest.raises(httpx.ReadTimeout):  # a plain request whose client gives up
            client.post(f"{u}/v1/completions", json=body | {"stream": False}, timeout=0.5)
        wait_for(lambda: idle(u), "the abandoned request's blocks")
        with client.stream("POST", f"{u}/v1/completions", json=body | {"n": 3}) as r:  # every choice's request
            lines = (ln for ln in r.iter_lines() if ln)
            for _ in range(3):
                assert next(lines).startswith("data: ")
        wait_for(lambda: idle(u), "the aborted choices' blocks")
        m = scrape(u)
        assert m["specdec:request_success_total{finished_reason=abort}"] == 5
        assert m["specdec:generation_tokens_total"] < 2000
        r = client.post(f"{u}/v1/completions", json={"prompt": [5], "max_tokens": 3})
        assert r.status_code == 200 and len(r.json()["choices"][0]["token_ids"]) <= 3


# --- bad requests ------------------------------------------------------------------------------------------------

BAD = [  # (body or raw text, status, param, words in the message)
    ("{not json", 400, None, "not valid JSON"),
    ("[1, 2]", 400, None, "JSON object"),
    ({"prompt": "x", "max_tokens": "5"}, 400, "max_tokens", "valid integer"),
    ({"prompt": "x", "max_tokens": True}, 400, "max_tokens", "valid integer"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens", "positive integer"),
    ({"prompt": "x", "temperature": -1}, 400, "temperature", ">= 0"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p", "(0, 1]"),
    ({"prompt": "x", "top_k": -5}, 400, "top_k", "integer"),
    ({"prompt": "x", "seed": -1}, 400, "seed", "2**64"),
    ({"prompt": "x", "stop": [""]}, 400, "stop", "empty"),
    ({"prompt": "x", "stop": [1.5]}, 400, "stop", "valid"),
    ({"prompt": "x", "n": 0}, 400, "n", "between 1 and 64"),
    ({"prompt": "x", "n": 65}, 400, "n", "between 1 and 64"),
    ({"prompt": "x", "logprobs": 21}, 400, "logprobs", "integer in [0, 20]"),
    ({"prompt": "x", "best_of": 2}, 400, "best_of", "not supported"),
    ({"prompt": "x", "presence_penalty": 3}, 400, "presence_penalty", "[-2, 2]"),
    ({"prompt": "x", "repetition_penalty": 0}, 400, "repetition_penalty", "> 0"),
    ({"prompt": "x", "logit_bias": {"a": 1}}, 400, "logit_bias", "token ids"),
    ({"prompt": "x", "logit_bias": {"3": 500}}, 400, "logit_bias", "[-100, 100]"),
    ({"prompt": "x", "logit_bias": {str(VOCAB): 1}}, 400, None, "outside the vocabulary"),
    ({"prompt": "x", "min_tokens": 50, "max_tokens": 5}, 400, "min_tokens", "max_tokens=5"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options", "stream=true"),
    ({"max_tokens": 4}, 400, "prompt", "required"),
    ({"prompt": ""}, 400, "prompt", "empty"),
    ({"prompt": ["a", [1]]}, 400, "prompt", "not a mix"),
    ({"prompt": [1, VOCAB]}, 400, "prompt", "outside the vocabulary"),
    ({"prompt": [1, 2], "max_tokens": 2047}, 400, None, "exceed the context"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model", "does not exist"),
]
BAD_CHAT = [
    ({"messages": []}, 400, "messages", "at least one"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages", "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400, "messages",
     "text parts"),
    ({"messages": [{"role": "user"}]}, 400, "messages", "cannot render"),
    ({"messages": [{"role": "user", "content": "x" * 3000}]}, 400, "messages", "leaves no room"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "max_completion_tokens": 6}, 400,
     "max_completion_tokens", "disagree"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400, "top_logprobs", "logprobs=true"),
    ({"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 30}, 400, "top_logprobs",
     "between 0 and 20"),
]


@pytest.mark.parametrize("path, cases", [("/v1/completions", BAD), ("/v1/chat/completions", BAD_CHAT)],
                         ids=["completions", "chat"])
def test_bad_requests_get_a_4xx_and_leave_the_server_healthy(url: str, path: str, cases: list) -> None:
    with httpx.Client(timeout=30) as client:
        for body, status, param, words in cases:
            for stream in (False, True):
                if isinstance(body, str):
                    r = client.post(url + path, content=body, headers={"content-type": "application/json"})
                else:
                    r = client.post(url + path, json=body | {"stream": stream} if "stream_options" not in body
                                    else body)
                check_error(r, status, param, words)
        check_error(client.get(f"{url}/v1/nothing"), 404, None, "Not Found")
        assert client.get(f"{url}/health").status_code == 200
        r = client.post(url + path, json={"prompt": "x", "messages": [{"role": "user", "content": "x"}],
                                          "max_tokens": 2})
        assert r.status_code == 200, r.text
    wait_for(lambda: idle(url), "the pool to empty")


def test_without_a_tokenizer_text_is_refused_and_ids_work(tmp_path: Path) -> None:
    ck = agreeable_checkpoint(tmp_path / "ids", seed=3)
    with serving(ck) as u, httpx.Client(timeout=30) as client:
        check_error(client.post(f"{u}/v1/completions", json={"prompt": "text"}), 400, "prompt", "token ids")
        check_error(client.post(f"{u}/v1/completions", json={"prompt": [3], "stop": ["x"]}), 400, None,
                     "stop strings need a tokenizer")
        check_error(client.post(f"{u}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}),
                     400, "messages", "no tokenizer")
        r = client.post(f"{u}/v1/completions", json={"prompt": [3, 4], "max_tokens": 4, "stop": [7]})
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == "", r.text


def test_a_full_queue_is_a_503(ckpt: Path) -> None:
    """One running slot, at most one waiting request: a third request is refused until the queue moves."""
    with serving(ckpt, max_queued_requests=1, max_num_seqs=1) as u, httpx.Client(timeout=60) as client, \
            ThreadPoolExecutor(1) as ex:
        long = {"prompt": [5, 6], "max_tokens": 2000, "ignore_eos": True, "stream": True}
        with client.stream("POST", f"{u}/v1/completions", json=long) as r:
            lines = r.iter_lines()  # kept: a dropped line iterator closes the stream (and aborts the request)
            next(lines)
            waiter = ex.submit(httpx.post, f"{u}/v1/completions", json={"prompt": [5], "max_tokens": 2}, timeout=60)
            wait_for(lambda: scrape(u)["specdec:num_requests_waiting"] == 1, "the second request to wait")
            r3 = client.post(f"{u}/v1/completions", json={"prompt": [5], "max_tokens": 2})
            check_error(r3, 503, None, "busy")
            assert r3.json()["error"]["code"] == "queue_full"
        assert waiter.result().status_code == 200  # the closed stream's abort let it run
        r = client.post(f"{u}/v1/completions", json={"prompt": [5], "max_tokens": 2})
        assert r.status_code == 200, r.text


def test_an_engine_failure_is_a_503_and_marks_the_server_down(ckpt: Path) -> None:
    llm = LLM(ckpt, dtype="float32", speculative=TREE)
    with BackgroundServer(create_app(llm, "tiny")) as s, httpx.Client(timeout=30) as client:
        assert client.post(f"{s.base_url}/v1/completions", json={"prompt": [5], "max_tokens": 2}).status_code == 200

        def broken(*args, **kwargs):
            raise RuntimeError("simulated device failure")

        llm.engine_step = broken
        r = client.post(f"{s.base_url}/v1/completions", json={"prompt": [5], "max_tokens": 2})
        assert r.status_code == 503 and "simulated device failure" in r.json()["error"]["message"], r.text
        assert r.json()["error"]["code"] == "engine_down" and "Traceback" not in r.text
        assert client.get(f"{s.base_url}/health").status_code == 503
        assert client.post(f"{s.base_url}/v1/completions", json={"prompt": [5]}).status_code == 503


def test_non_finite_logits_are_a_500_for_that_request_only(ckpt: Path) -> None:
    """Logits that turn NaN fail the request they belong to with a JSON 500 naming it (streamed: an error event,
    then [DONE]), never a traceback; the server stays healthy and the next request is served."""
    llm = LLM(ckpt, dtype="float32", speculative=TREE)
    real, broken = llm.model.logits, {"on": False}

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        out = real(hidden)
        return out.masked_fill(torch.ones_like(out, dtype=torch.bool), float("nan")) if broken["on"] else out

    llm.model.logits = logits
    body = {"prompt": [5, 6], "max_tokens": 4, "ignore_eos": True}
    with BackgroundServer(create_app(llm, "tiny")) as s, httpx.Client(timeout=30) as client:
        u = s.base_url
        broken["on"] = True
        r = client.post(f"{u}/v1/completions", json=body)
        err = r.json()["error"]
        assert r.status_code == 500 and err["code"] == "generation_failed", r.text
        assert "logits are not finite" in err["message"] and "Traceback" not in r.text, r.text
        with client.stream("POST", f"{u}/v1/completions", json=body | {"stream": True}) as st:
            lines = [ln for ln in st.iter_lines() if ln]
        assert st.status_code in (200, 500), lines
        assert any("logits are not finite" in ln for ln in lines) and "Traceback" not in "".join(lines), lines
        broken["on"] = False
        wait_for(lambda: idle(u), "the failed requests' blocks to return")
        assert client.get(f"{u}/health").status_code == 200
        r = client.post(f"{u}/v1/completions", json=body)
        assert r.status_code == 200 and len(r.json()["choices"][0]["token_ids"]) == 4, r.text
    llm.close()


@pytest.mark.parametrize("argv, needle", [
    (["--port", "70000"], "--port 70000"),
    (["--max-num-seqs", "0"], "--max-num-seqs 0"),
    (["--max-queued-requests", "0"], "--max-queued-requests 0"),
    (["--max-request-body-mb", "0"], "--max-request-body-mb: must be a positive integer"),
    (["--served-model-name", ""], "--served-model-name '': must name the model"),
    (["--no-mtp", "--topk", "2"], "drop --topk"),
    (["--host", "no.such.host.invalid"], "cannot resolve"),
])
def test_serve_flags_are_one_line_errors(ckpt: Path, argv: list[str], needle: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    one_line_error(capsys, ["serve", "--model", str(ckpt), *argv], needle)


def test_serve_refuses_a_port_in_use(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        one_line_error(capsys, ["serve", "--model", str(ckpt), "--port", str(taken.getsockname()[1])],
                       "cannot listen on 127.0.0.1")


# --- metrics -------------------------------------------------------------------------------------------------------

def test_metrics_add_up_to_the_responses(ckpt: Path, seed: int) -> None:
    rng = random.Random(seed)
    with serving(ckpt) as u, httpx.Client(timeout=60) as client:
        specs, usages = [], []
        shared = [rng.randrange(2, VOCAB) for _ in range(150)]  # sent twice: 128 cached tokens the second time
        for i in range(6):
            prompt = shared if i >= 4 else [rng.randrange(2, VOCAB) for _ in range(rng.randint(1, 20))]
            body = {"prompt": prompt, "max_tokens": rng.randint(1, 40), "temperature": 0, "ignore_eos": True}
            if i % 2:
                ev = events(client, u, body | {"stream_options": {"include_usage": True}})
                specs.append(ev[-1]["spec_decode"])
                usages.append(ev[-1]["usage"])
            else:
                r = client.post(f"{u}/v1/completions", json=body).json()
                specs.append(r["spec_decode"])
                usages.append(r["usage"])
        assert usages[5]["prompt_tokens_details"]["cached_tokens"] == 128, usages[5]
        m = scrape(u)
        assert m["specdec:prefix_cache_queries_total"] == sum(x["prompt_tokens"] for x in usages)
        assert m["specdec:prefix_cache_hits_total"] == sum(x["prompt_tokens_details"]["cached_tokens"]
                                                           for x in usages) >= 128
        tokens = sum(x["completion_tokens"] for x in usages)
        p = "specdec:spec_decode_"
        assert m[p + "num_drafts_total"] == sum(s["num_drafts"] for s in specs) > 0, f"seed={seed}"
        assert m[p + "num_draft_tokens_total"] == sum(s["num_draft_tokens"] for s in specs)
        assert m[p + "num_accepted_tokens_total"] == sum(s["num_accepted_tokens"] for s in specs)
        for d in range(TREE.num_speculative_tokens):
            assert m[f"{p}num_accepted_tokens_per_pos_total{{position={d}}}"] == \
                sum(s["num_accepted_tokens_per_pos"][d] for s in specs), f"seed={seed} position {d}"
        assert m["specdec:generation_tokens_total"] == tokens
        for h in ("time_to_first_token_seconds", "e2e_request_latency_seconds"):
            assert m[f"specdec:{h}_count"] == 6 and m[f"specdec:{h}_sum"] > 0
        assert m["specdec:num_requests_running"] == 0 and m["specdec:num_requests_waiting"] == 0


# --- tensor parallelism and the CLI -------------------------------------------------------------------------------

def test_tensor_parallel_server_equals_one_rank(ckpt: Path, alone: LLM, seed: int) -> None:
    """--tp 2: rank 0 serves, the spawned worker replays its engine steps."""
    with serving(ckpt, tensor_parallel_size=2) as u:
        _concurrently(u, _greedy(seed, 4, (1, 30), (1, 30)), alone, seed, spread_s=0.1)


def test_serve_cli_answers_and_exits_on_sigterm(ckpt: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "specdec", "serve", "--model", str(ckpt), "--port", "0",
                             "--threads", "1", "--served-model-name", "cli"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert " at http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        u = line.rsplit(" at ", 1)[1].strip()
        wait_for(lambda: healthy(u), "the server to answer")
        with httpx.Client(timeout=30) as client:
            r = client.post(f"{u}/v1/completions", json={"model": "cli", "prompt": "x", "max_tokens": 3})
            assert r.status_code == 200, r.text
            with client.stream("POST", f"{u}/v1/completions",
                               json={"prompt": [5], "max_tokens": 2000, "ignore_eos": True, "stream": True}) as s:
                lines = (ln for ln in s.iter_lines() if ln)
                next(lines)
                t0 = time.monotonic()
                proc.send_signal(signal.SIGTERM)
                rest = list(lines)  # the request is aborted at once: its stream ends cleanly
        assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "abort"
        rc = proc.wait(timeout=30)
        took = time.monotonic() - t0
        print(f"SIGTERM to exit: {took:.2f} s")  # about 0.3 s on an idle 2-core machine (docs/server.md)
        err = proc.stderr.read()
        assert rc == 0 and took < 5, (rc, took, err)
        assert "Traceback" not in err and "finish length" in err and "finish abort" in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
