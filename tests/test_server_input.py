"""What requests bring in, over real HTTP with the openai client: OpenAI's batch of prompts, text encoded by the
checkpoint's own rule (transformers' AutoTokenizer as the oracle), request bodies and prompts too large to serve
refused without stalling the server, tokenizing off the event loop, and malformed input (lone surrogates, the
developer role, field names in errors, stop ids outside the vocabulary)."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from models import VOCAB, byte_bpe
from serving import BOS, TREE, check_error, client, idle, serving, wait_for

from specdec import LLM, SamplingParams
from specdec.api import BUNDLED_MODEL, encode_text
from specdec.prompts import held_out_prompts
from specdec.server.app import create_app
from specdec.server.background import BackgroundServer
from specdec.server.chat import ChatTemplate

# --- a batch of prompts ------------------------------------------------------------------------------------------

def test_a_batch_of_prompts_is_served_as_vllm_does(url: str, alone: LLM) -> None:
    """prompt=[a, b] with n=2: choice p * n + i is prompt p's i-th (seeded seed + i), usage sums the prompts; the
    same streamed; token-id lists too."""
    prompts, n, extra = ["def parse(text):", "class Queue:"], 2, {"ignore_eos": True}
    ids = [alone.encode(p) for p in prompts]
    wants = [alone.generate([p], SamplingParams(max_tokens=6, temperature=0.9, seed=7 + i, ignore_eos=True))[0]
             for p in prompts for i in range(n)]
    r = client(url).completions.create(model="tiny", prompt=prompts, n=n, max_tokens=6, temperature=0.9, seed=7,
                                       extra_body=extra)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.token_ids for c in r.choices] == [w.token_ids for w in wants]
    assert [c.text for c in r.choices] == [w.text for w in wants]
    assert r.usage.prompt_tokens == sum(map(len, ids)) and r.usage.completion_tokens == 24

    chunks = list(client(url).completions.create(model="tiny", prompt=ids, n=n, max_tokens=6, temperature=0.9,
                                                 seed=7, stream=True, stream_options={"include_usage": True},
                                                 extra_body=extra))
    got: dict[int, list[int]] = {i: [] for i in range(4)}
    for ch in chunks[:-1]:
        got[ch.choices[0].index] += ch.choices[0].token_ids
    assert list(got.values()) == [w.token_ids for w in wants]
    assert chunks[-1].usage.prompt_tokens == sum(map(len, ids)) and chunks[-1].usage.completion_tokens == 24


def test_a_batch_scores_like_lm_eval(url: str, alone: LLM) -> None:
    """lm-eval's loglikelihood requests: a batch of texts with echo, logprobs=1, max_tokens=1; each choice carries
    its own prompt's text and logprobs, equal to what the prompt gets alone."""
    prompts = ["def parse(text):\n    return", "import os"]
    r = client(url).completions.create(model="tiny", prompt=prompts, echo=True, logprobs=1, max_tokens=1,
                                       temperature=0)
    assert len(r.choices) == 2
    for p, ch in zip(prompts, r.choices):
        alone_r = client(url).completions.create(model="tiny", prompt=p, echo=True, logprobs=1, max_tokens=1,
                                                 temperature=0)
        assert ch.text.startswith(p) and ch.text == alone_r.choices[0].text
        lp, want = ch.logprobs, alone_r.choices[0].logprobs
        assert lp.tokens == want.tokens and len(lp.tokens) == len(alone.encode(p)) + 1
        assert lp.token_logprobs[1:] == pytest.approx(want.token_logprobs[1:], abs=1e-5)


# --- the BOS rule --------------------------------------------------------------------------------------------------

def test_text_is_encoded_as_the_tokenizer_files_say(ckpt: Path, alone: LLM, url: str, tmp_path: Path) -> None:
    """Text prompts get what AutoTokenizer gives (the tokenizer.json post-processor's BOS here), token ids are used
    as given: a text prompt and its AutoTokenizer ids give the same completion, and ids without a BOS get none."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(ckpt)
    text = "def parse(text):\n    return"
    ids = hf(text)["input_ids"]
    assert ids[0] == alone.config.bos_token_id and alone.encode(text) == ids
    assert alone.encode(text, add_special_tokens=False) == ids[1:]
    c = client(url)
    by_text = c.completions.create(model="tiny", prompt=text, max_tokens=5, temperature=0)
    by_ids = c.completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0)
    no_bos = c.completions.create(model="tiny", prompt=ids[1:], max_tokens=5, temperature=0)
    assert by_text.usage.prompt_tokens == len(ids) and no_bos.usage.prompt_tokens == len(ids) - 1
    assert by_text.choices[0].token_ids == by_ids.choices[0].token_ids
    assert no_bos.choices[0].token_ids == alone.generate([ids[1:]], SamplingParams(max_tokens=5,
                                                                                   temperature=0))[0].token_ids

    plain = tmp_path / "no_post_processor"  # a tokenizer.json that adds nothing: text gets no BOS, as in transformers
    plain.mkdir()
    (plain / "config.json").write_text((ckpt / "config.json").read_text())
    tok = byte_bpe(held_out_prompts())
    tok.post_processor = None
    tok.save(str(plain / "tokenizer.json"))
    want = transformers.AutoTokenizer.from_pretrained(plain)(text)["input_ids"]
    assert want == ids[1:]
    assert encode_text(tok, text) == want


def test_the_bundled_tokenizer_files() -> None:
    """The bundled folder loads in transformers with its BOS/EOS, encodes text as LLM does (BOS first, so generation
    is what it was when LLM put the BOS before the text itself), and its chat template is the one the server
    renders."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer

    hf = transformers.AutoTokenizer.from_pretrained(BUNDLED_MODEL)
    tok = Tokenizer.from_file(str(BUNDLED_MODEL / "tokenizer.json"))
    assert (hf.bos_token, hf.bos_token_id, hf.eos_token, hf.eos_token_id) == (BOS, 0, "<|end▁of▁sentence|>", 1)
    for text in held_out_prompts(3) + ["x = 1", "déjà vu ✓"]:  # as LLM put the BOS before the text before
        assert encode_text(tok, text) == hf(text)["input_ids"] == [0, *tok.encode(text, add_special_tokens=False).ids]
    messages = [{"role": "system", "content": "Small helpers."}, {"role": "user", "content": "Parse a line."},
                {"role": "assistant", "content": "def parse(line):\n    return line.split()"},
                {"role": "user", "content": "Now with commas."}]
    template = ChatTemplate.load(BUNDLED_MODEL, tok, 0, (1,))
    text = template.render(messages, True)
    assert template.origin.endswith("tokenizer_config.json")
    assert text == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.startswith(BOS) and '"""Parse a line."""\n' in text
    assert encode_text(tok, text, add_special_tokens=False) == hf.apply_chat_template(
        messages, add_generation_prompt=True)["input_ids"]


# --- sizes: the body limit, the character rule, and the event loop ------------------------------------------------

def test_a_body_over_the_limit_is_a_413(ckpt: Path) -> None:
    with serving(ckpt, max_request_bytes=2**20) as u, httpx.Client(timeout=30) as c:
        big = {"prompt": "x" * (2**20 + 10), "max_tokens": 2}
        r = c.post(f"{u}/v1/completions", json=big)  # Content-Length says so: refused before it is read
        check_error(r, 413, None, "more than the 1048576 bytes this server takes (--max-request-body-mb)")
        assert r.json()["error"]["code"] == "request_too_large"
        data = json.dumps(big).encode()
        r = c.post(f"{u}/v1/completions", content=(data[i:i + 65536] for i in range(0, len(data), 65536)),
                   headers={"content-type": "application/json"})  # chunked: refused once the chunks pass it
        check_error(r, 413, None, "more than the 1048576 bytes")
        with pytest.raises(openai.APIStatusError) as e:
            client(u).completions.create(model="tiny", prompt="x" * 2**20, max_tokens=2)
        assert e.value.status_code == 413
        r = c.post(f"{u}/v1/completions", json={"prompt": "x" * 1000, "max_tokens": 2})
        assert r.status_code == 200, r.text


def test_text_longer_than_the_context_can_hold_is_refused_before_tokenizing(ckpt: Path) -> None:
    llm = LLM(ckpt, dtype="float32", speculative=TREE)
    calls: list[int] = []
    encode = llm.encode
    llm.encode = lambda text, *a, **k: calls.append(len(text)) or encode(text, *a, **k)
    longest = max(map(len, llm.tokenizer.get_vocab(with_added_tokens=True)))
    limit = llm.max_model_len * longest
    try:
        with BackgroundServer(create_app(llm, "tiny")) as s, httpx.Client(timeout=60) as c:
            r = c.post(f"{s.base_url}/v1/completions", json={"prompt": "y" * (limit + 1)})
            check_error(r, 400, "prompt", f"prompt: {limit + 1} characters cannot fit the context: "
                                          f"{llm.max_model_len} tokens (max_model_len) of at most {longest} characters")
            r = c.post(f"{s.base_url}/v1/completions", json={"prompt": ["ok", "y" * (limit + 1)]})
            check_error(r, 400, "prompt", "prompt[1]:")
            r = c.post(f"{s.base_url}/v1/chat/completions",
                       json={"messages": [{"role": "user", "content": "y" * limit}]})
            check_error(r, 400, "messages", "messages: the rendered prompt:")
            assert calls == [2]  # only "ok": the others never reached the tokenizer
            r = c.post(f"{s.base_url}/v1/completions", json={"prompt": list(range(llm.max_model_len + 1))})
            check_error(r, 400, "prompt", f"exceed the context of {llm.max_model_len} (max_model_len)")
    finally:
        llm.close()


def test_tokenizing_and_chat_templates_run_off_the_event_loop(ckpt: Path) -> None:
    llm = LLM(ckpt, dtype="float32", speculative=TREE)
    threads: list[str] = []
    encode = llm.encode
    llm.encode = lambda text, *a, **k: threads.append(threading.current_thread().name) or encode(text, *a, **k)
    try:
        with BackgroundServer(create_app(llm, "tiny")) as s, httpx.Client(timeout=60) as c:
            assert c.post(f"{s.base_url}/v1/completions", json={"prompt": "def", "max_tokens": 1}).status_code == 200
            r = c.post(f"{s.base_url}/v1/chat/completions",
                       json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
            assert r.status_code == 200, r.text
    finally:
        llm.close()
    assert len(threads) == 2 and "specdec-http" not in threads, threads  # the event loop's thread


def test_encode_lets_other_threads_run(alone: LLM) -> None:
    """LLM.encode releases the GIL (tokenizers' encode holds it: a 9 MB prompt stalled every thread for 15 s)."""
    text = "\n".join(held_out_prompts()) * 400  # ~1.5 MB: about a second of tokenizing
    done, ticks = threading.Event(), [0]

    def tick() -> None:
        while not done.is_set():
            time.sleep(0.001)
            ticks[0] += 1

    t = threading.Thread(target=tick)
    t.start()
    t0 = time.perf_counter()
    alone.encode(text)
    took = time.perf_counter() - t0
    done.set()
    t.join()
    assert ticks[0] > 20 * took, (ticks[0], took)  # ~1000 per second when released, a handful when held


def test_health_and_streams_keep_answering_while_a_huge_prompt_is_refused(url: str) -> None:
    """An 8 MB prompt (within the 32 MiB body limit, past the character rule): /health answers within moments
    and a running stream keeps sending, while it is refused."""
    huge = {"prompt": "def f(x):\n    return x\n" * 350_000, "max_tokens": 4}  # 8.4 MB
    with httpx.Client(timeout=60) as c, ThreadPoolExecutor(2) as ex:
        body = {"prompt": [5, 6], "max_tokens": 2000, "ignore_eos": True, "stream": True}
        with c.stream("POST", f"{url}/v1/completions", json=body) as st:
            lines = st.iter_lines()
            next(lines)
            refused = ex.submit(httpx.post, f"{url}/v1/completions", json=huge, timeout=60)
            health, gaps, last = [], [], time.monotonic()
            while not refused.done():
                t0 = time.monotonic()
                assert httpx.get(f"{url}/health", timeout=30).status_code == 200
                health.append(time.monotonic() - t0)
                while not next(lines):  # the blank line between events
                    pass
                gaps.append(time.monotonic() - last)
                last = time.monotonic()
    print(f"/health: {len(health)} calls, slowest {max(health):.3f} s; stream gaps up to {max(gaps):.3f} s")
    assert max(health) < 1.0 and max(gaps) < 1.0, (health, gaps)
    check_error(refused.result(), 400, "prompt", "cannot fit the context")
    wait_for(lambda: idle(url), "the pool to empty")


# --- malformed input ---------------------------------------------------------------------------------------------

def test_a_lone_surrogate_in_chat_is_a_400_naming_the_message(url: str) -> None:
    cases = [([{"role": "user", "content": "ok"}, {"role": "user", "content": "ab\ud800"}],
              "messages[1].content: not valid UTF-8 text (character 2: '\\ud800')"),
             ([{"role": "user", "content": [{"type": "text", "text": "\udcff"}]}], "messages[0].content[0].text:"),
             ([{"role": "user", "content": "ok", "name": "x\ud800"}], "messages[0].name:")]
    with httpx.Client(timeout=30) as c:
        for messages, words in cases:  # json.dumps escapes the surrogate as \ud800, as a client's JSON would
            r = c.post(f"{url}/v1/chat/completions", content=json.dumps({"messages": messages}),
                       headers={"content-type": "application/json"})
            check_error(r, 400, "messages", words)
        r = c.post(f"{url}/v1/completions", content=json.dumps({"prompt": "ab\ud800"}),
                   headers={"content-type": "application/json"})
        check_error(r, 400, "prompt", "prompt: not valid UTF-8 text")
        assert c.get(f"{url}/health").status_code == 200


def test_the_developer_role_is_a_system_message(url: str) -> None:
    """OpenAI's newer name for system: the V3-style template puts it first, as it does a system message."""
    c = client(url)
    asked = [{"role": "user", "content": "Write a loop."}]
    dev = c.chat.completions.create(model="tiny", messages=[{"role": "developer", "content": "Be brief."}, *asked],
                                    max_tokens=6, temperature=0)
    sys_ = c.chat.completions.create(model="tiny", messages=[{"role": "system", "content": "Be brief."}, *asked],
                                     max_tokens=6, temperature=0)
    assert dev.usage.prompt_tokens == sys_.usage.prompt_tokens
    assert dev.choices[0].token_ids == sys_.choices[0].token_ids


def test_errors_name_the_field_the_client_sent(url: str, alone: LLM) -> None:
    with httpx.Client(timeout=30) as c:
        msgs = [{"role": "user", "content": "hi"}]
        r = c.post(f"{url}/v1/chat/completions", json={"messages": msgs, "max_completion_tokens": -1})
        check_error(r, 400, "max_completion_tokens", "max_completion_tokens must be a positive integer")
        r = c.post(f"{url}/v1/chat/completions", json={"messages": msgs, "max_tokens": -1})
        check_error(r, 400, "max_tokens", "max_tokens must be a positive integer")
        for body in ({"prompt": [5], "stop_token_ids": [VOCAB]}, {"prompt": [5], "stop": [VOCAB + 7]}):
            r = c.post(f"{url}/v1/completions", json=body)
            check_error(r, 400, None, "stop_token_ids names token")
    with pytest.raises(ValueError, match=f"prompt 0: stop_token_ids names token {VOCAB}, outside the vocabulary"):
        alone.generate([[5]], SamplingParams(stop_token_ids=[3, VOCAB]))


def test_an_empty_served_model_name_is_refused(alone: LLM) -> None:
    with pytest.raises(ValueError, match="served_model_name must not be empty"):  # the CLI's: test_server.py
        create_app(alone, " ")
