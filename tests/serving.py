"""What the server tests share: a tiny agreeable checkpoint with a byte-level BPE tokenizer and a DeepSeek-V3-style
chat template, a server on it on 127.0.0.1, /metrics scraped, SSE streams read, OpenAI-style errors checked; the
fixtures `ckpt`, `alone` and `url` (one of each per test module; conftest.py registers this module as a plugin)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
from models import VOCAB, agreeable_checkpoint, byte_bpe
from prometheus_client.parser import text_string_to_metric_families

from specdec import LLM, SpecConfig
from specdec.prompts import held_out_prompts
from specdec.server.app import create_app
from specdec.server.background import BackgroundServer

TREE = SpecConfig(3, topk=2, adaptive=False)  # a fixed shape: the tests compare acceptance between engines
BOS, EOS = "<|begin▁of▁sentence|>", "<|end▁of▁sentence|>"
V3_TEMPLATE = (  # shaped like DeepSeek-V3's: system prompts first, then <｜User｜> / <｜Assistant｜> turns
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(system_prompt='') %}{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = ns.system_prompt + message['content'] %}{%- endif %}{%- endfor %}"
    "{{ bos_token }}{{ ns.system_prompt }}{%- for message in messages %}{%- if message['role'] == 'user' %}"
    "{{ '<｜User｜>' + message['content'] }}{%- endif %}{%- if message['role'] == 'assistant' %}"
    "{{ '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}{%- endif %}{%- endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)


def server_checkpoint(path: Path) -> Path:
    """An agreeable checkpoint with a tokenizer and a DeepSeek-V3-style chat template; 2048 positions, so long
    requests outlast the tests' disconnects."""
    path = agreeable_checkpoint(path, vocab_size=VOCAB, seed=1, noise=0.14, max_position_embeddings=2048)
    byte_bpe(held_out_prompts()).save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"__type": "AddedToken", "content": BOS},
                                                            "eos_token": EOS, "chat_template": V3_TEMPLATE}))
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return server_checkpoint(tmp_path_factory.mktemp("server") / "ckpt")


@pytest.fixture(scope="module")
def alone(ckpt: Path) -> LLM:
    """Runs each request by itself: the reference outputs."""
    return LLM(ckpt, dtype="float32", speculative=TREE)


@pytest.fixture(scope="module")
def url(ckpt: Path) -> Iterator[str]:
    """One server for the tests that need no fresh state."""
    with serving(ckpt) as u:
        yield u


@contextmanager
def serving(ckpt: Path, name: str = "tiny", max_queued_requests: int = 256, max_request_bytes: int | None = None,
            **llm_kw) -> Iterator[str]:
    """A server on a fresh LLM of ckpt (tree drafts unless llm_kw says otherwise); yields its base URL."""
    llm = LLM(ckpt, dtype="float32", **({"speculative": TREE} | llm_kw))
    limit = {} if max_request_bytes is None else {"max_request_bytes": max_request_bytes}
    try:
        with BackgroundServer(create_app(llm, name, max_queued_requests, **limit)) as s:
            yield s.base_url
    finally:
        llm.close()


def client(url: str) -> openai.OpenAI:
    """The official client on the server at url (no retries: a test sees each status)."""
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def scrape(url: str) -> dict[str, float]:
    """/metrics through prometheus_client's parser: {'name{label=value}': value}."""
    text = httpx.get(f"{url}/metrics").text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def events(client: httpx.Client, url: str, body: dict, path: str = "/v1/completions") -> list[dict]:
    """A whole SSE stream's events (checked to end with [DONE])."""
    with client.stream("POST", url + path, json=body | {"stream": True}) as r:
        assert r.status_code == 200, r.read()
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]", lines[-3:]
    return [json.loads(ln[6:]) for ln in lines[:-1]]


def wait_for(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def idle(url: str) -> bool:
    m = scrape(url)
    return m["specdec:kv_cache_usage_perc"] == 0 and m["specdec:num_requests_running"] == 0


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health").status_code == 200
    except httpx.HTTPError:
        return False


def check_error(r: httpx.Response, status: int, param: str | None, words: str) -> None:
    """An OpenAI-style error: status, one-line message containing words, param, no traceback."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and "Traceback" not in r.text, err
    assert err["param"] == param and words in err["message"] and "\n" not in err["message"], err
    assert err["type"] == {400: "invalid_request_error", 404: "NotFoundError"}.get(status, err["type"])
