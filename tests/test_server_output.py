"""What responses carry, over real HTTP with the openai client: vLLM's continuous_usage_stats, logprobs in OpenAI's
shapes (the sampled token among completions' top_logprobs, chat's top n, special tokens named), /metrics counting
each prompt once as usage does, Retry-After on 503s, and the model's length as LLM reports it."""

from __future__ import annotations

from pathlib import Path

import httpx
from serving import BOS, EOS, TREE, client, scrape, serving

from specdec import LLM, SamplingParams
from specdec.server.app import create_app
from specdec.server.background import BackgroundServer


def test_continuous_usage_stats_put_usage_in_every_chunk(url: str) -> None:
    """guidellm's stream_options: every chunk carries its choice's usage so far, as vLLM's do; the usage chunk
    still closes the stream."""
    opts = {"include_usage": True, "continuous_usage_stats": True}
    chunks = list(client(url).completions.create(model="tiny", prompt=[5, 9, 31], max_tokens=12, n=2, stream=True,
                                                 stream_options=opts, extra_body={"ignore_eos": True}))
    so_far = {0: 0, 1: 0}
    for ch in chunks[:-1]:
        i = ch.choices[0].index
        so_far[i] += len(ch.choices[0].token_ids)
        assert ch.usage.prompt_tokens == 3 and ch.usage.completion_tokens == so_far[i]
        assert ch.usage.total_tokens == 3 + so_far[i]
    assert so_far == {0: 12, 1: 12} and not chunks[-1].choices and chunks[-1].usage.completion_tokens == 24

    chat = list(client(url).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                    max_tokens=5, stream=True, stream_options=opts))
    assert chat[0].choices[0].delta.role == "assistant" and chat[0].usage.completion_tokens == 0
    assert all(ch.usage is not None for ch in chat)
    assert chat[-2].usage.completion_tokens == chat[-1].usage.completion_tokens
    plain = list(client(url).completions.create(model="tiny", prompt=[5], max_tokens=3, stream=True))
    assert all(ch.usage is None for ch in plain)


def test_completions_top_logprobs_hold_the_sampled_token(url: str, alone: LLM) -> None:
    """OpenAI and vLLM: the n most likely and the sampled token, so up to n + 1 entries; logprobs=0 gives the
    sampled token alone."""
    c = client(url)
    for n in (0, 2):
        body = dict(model="tiny", prompt=[5, 9, 31], max_tokens=16, temperature=1.5, seed=3, logprobs=n,
                    extra_body={"ignore_eos": True})
        want = alone.generate([[5, 9, 31]], SamplingParams(max_tokens=16, temperature=1.5, seed=3, logprobs=n,
                                                           ignore_eos=True))[0]
        for lp in (c.completions.create(**body).choices[0].logprobs,
                   *(ch.choices[0].logprobs for ch in c.completions.create(**body, stream=True))):
            for name, v, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
                assert top[name] == v and len(top) <= n + 1
        full = c.completions.create(**body).choices[0].logprobs
        names = [{alone.tokenizer.decode([u], skip_special_tokens=False) for u in d} for d in want.logprobs]
        assert [set(top) for top in full.top_logprobs] == names  # (tokens of one text share a key)
        if n == 0:
            assert all(len(top) == 1 for top in full.top_logprobs)
        else:  # sampling at temperature 1.5 picks tokens outside the top 2 now and then
            assert any(len(top) == n + 1 for top in full.top_logprobs), want.logprobs


def test_chat_top_logprobs_are_the_n_most_likely(url: str) -> None:
    """OpenAI's chat shape: top_logprobs holds exactly the n most likely (the sampled token only if it is among
    them), most likely first; top_logprobs=0 gives none; the object has OpenAI's refusal field."""
    messages = [{"role": "user", "content": "Write a loop."}]
    for n in (0, 3):
        r = httpx.post(f"{url}/v1/chat/completions", timeout=30, json={
            "messages": messages, "max_tokens": 12, "temperature": 1.5, "seed": 5, "logprobs": True,
            "top_logprobs": n})
        lp = r.json()["choices"][0]["logprobs"]
        assert set(lp) == {"content", "refusal"} and lp["refusal"] is None
        for item in lp["content"]:
            tops = [t["logprob"] for t in item["top_logprobs"]]
            assert len(tops) == n and tops == sorted(tops, reverse=True)
            assert not tops or item["logprob"] <= tops[0] + 1e-6
            assert set(item) == {"token", "logprob", "bytes", "top_logprobs"}


def test_special_tokens_are_named_in_logprobs(url: str, alone: LLM) -> None:
    """The BOS of an echoed text prompt and a sampled EOS appear by name, as vLLM's logprobs show them; neither is
    in the text, so text_offset gives them no width."""
    prompt = "def parse(text):"
    r = client(url).completions.create(model="tiny", prompt=prompt, max_tokens=4, echo=True, logprobs=1,
                                       logit_bias={"1": 100})  # EOS first: the request stops there
    ch = r.choices[0]
    assert ch.finish_reason == "stop" and ch.token_ids == [1] and ch.text == prompt
    lp = ch.logprobs
    assert lp.tokens[0] == BOS and lp.tokens[-1] == EOS and "" not in lp.tokens
    assert lp.text_offset[:2] == [0, 0]
    for name, off in zip(lp.tokens[1:-1], lp.text_offset[1:-1]):
        assert ch.text[off:off + len(name)] == name
    assert lp.text_offset[-1] == len(prompt)


def test_prompt_tokens_total_counts_each_prompt_once(url: str) -> None:
    """/metrics adds up to usage: a prompt counted once however many choices it has; the prefix-cache counters
    count every choice's lookup."""
    before = scrape(url)
    r = client(url).completions.create(model="tiny", prompt=[[5, 6, 7], [8, 9]], n=3, max_tokens=2)
    after = scrape(url)
    assert r.usage.prompt_tokens == 5
    assert after["specdec:prompt_tokens_total"] - before["specdec:prompt_tokens_total"] == 5
    assert after["specdec:generation_tokens_total"] - before["specdec:generation_tokens_total"] == \
        r.usage.completion_tokens
    assert after["specdec:prefix_cache_queries_total"] - before["specdec:prefix_cache_queries_total"] == 15


def test_a_503_says_when_to_retry(ckpt: Path) -> None:
    llm = LLM(ckpt, dtype="float32", speculative=TREE)

    def broken(*args, **kwargs):
        raise RuntimeError("simulated device failure")

    try:
        with BackgroundServer(create_app(llm, "tiny")) as s, httpx.Client(timeout=30) as c:
            llm.engine_step = broken
            r = c.post(f"{s.base_url}/v1/completions", json={"prompt": [5], "max_tokens": 2})
            assert r.status_code == 503 and r.headers["retry-after"] == "1", r.headers
            assert c.get(f"{s.base_url}/health").headers["retry-after"] == "1"
            assert "retry-after" not in c.get(f"{s.base_url}/v1/models").headers
    finally:
        llm.close()


def test_models_report_the_length_a_request_can_have(ckpt: Path, url: str, alone: LLM) -> None:
    """max_model_len: the context (or the KV pool, if smaller) less a verify step's draft rows; a request of
    exactly that many tokens runs, one more is refused."""
    with serving(ckpt, kv_cache_tokens=640) as small:
        for u, pool in ((url, None), (small, 640)):
            length = client(u).models.list().data[0].model_extra["max_model_len"]
            assert length == min(2048, pool or 2048) - alone.engine.step_rows
            ok = httpx.post(f"{u}/v1/completions", json={"prompt": [5] * (length - 2), "max_tokens": 2}, timeout=60)
            assert ok.status_code == 200, ok.text
            over = httpx.post(f"{u}/v1/completions", json={"prompt": [5] * (length - 1), "max_tokens": 2},
                              timeout=60)
            assert over.status_code == 400, over.text
