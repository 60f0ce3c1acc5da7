"""Bad input gets an OpenAI-style error with a 4xx status, and the daemon keeps serving."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest

from models.catalog import DEFAULT_PAIR
from tandem.local import EdgeProcess

MODEL = DEFAULT_PAIR
OK_MSG = [{"role": "user", "content": "hi"}]


def _chat(**overrides: object) -> dict[str, object]:
    return {"model": MODEL, "messages": OK_MSG, "max_tokens": 2, **overrides}


BAD_BODIES = [
    # (id, raw body or JSON object, expected status, words the message must contain)
    ("malformed-json", b'{"model": "smollm2-135m", "messages": [', 400, "not valid JSON"),
    ("not-an-object", b"[1, 2]", 400, "JSON object"),
    ("missing-messages", {"model": MODEL}, 400, "messages"),
    ("empty-messages", _chat(messages=[]), 400, "messages"),
    ("bad-role", _chat(messages=[{"role": "wizard", "content": "x"}]), 400, "role"),
    ("messages-wrong-type", _chat(messages="hello"), 400, "messages"),
    ("temperature-type", _chat(temperature="hot"), 400, "temperature"),
    ("temperature-range", _chat(temperature=9), 400, "temperature"),
    ("top-p-zero", _chat(top_p=0), 400, "top_p"),
    ("max-tokens-zero", _chat(max_tokens=0), 400, "max_tokens"),
    ("max-tokens-negative", _chat(max_tokens=-5), 400, "max_tokens"),
    ("max-tokens-absurd", _chat(max_tokens=10**12), 400, "max_tokens"),
    ("max-tokens-over-context", _chat(max_tokens=100_000), 400, "Reduce max_tokens"),
    ("n-over-the-bound", _chat(n=9), 400, "n"),
    ("unknown-model", _chat(model="gpt-9"), 404, "gpt-9"),
    ("empty-stop", _chat(stop=[""]), 400, "stop"),
    (
        "tool-choice-unknown",
        _chat(
            tools=[{"type": "function", "function": {"name": "f"}}],
            tool_choice={"type": "function", "function": {"name": "g"}},
        ),
        400,
        "tool_choice",
    ),
    (
        "tool-choice-without-name",  # found by bench/fuzz_edge.py: was "names function None"
        _chat(
            tools=[{"type": "function", "function": {"name": "f"}}],
            tool_choice={"type": "function", "function": {}},
        ),
        400,
        "tool_choice.function.name",
    ),
    (
        "tool-bad-name",
        _chat(tools=[{"type": "function", "function": {"name": "a b"}}]),
        400,
        "tools",
    ),
    (
        "image-part",
        _chat(
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "http://x"}}],
                }
            ]
        ),
        400,
        "text content",
    ),
    (
        "prompt-over-context",
        _chat(messages=[{"role": "user", "content": "word " * 5000}]),
        400,
        "maximum context length",
    ),
    (
        "completion-token-out-of-vocab",
        {"model": MODEL, "prompt": [10**9], "max_tokens": 2},
        400,
        "token id",
    ),
    ("completion-echo", {"model": MODEL, "prompt": "hi", "echo": True}, 400, "echo"),
]


@pytest.mark.parametrize("case", BAD_BODIES, ids=[c[0] for c in BAD_BODIES])
def test_bad_request_gets_clear_openai_error(edge: EdgeProcess, case) -> None:  # type: ignore[no-untyped-def]
    _, body, status, words = case
    path = (
        "/v1/completions" if isinstance(body, dict) and "prompt" in body else "/v1/chat/completions"
    )
    if isinstance(body, bytes):
        resp = httpx.post(
            f"{edge.base_url}{path}", content=body, headers={"content-type": "application/json"}
        )
    else:
        resp = httpx.post(f"{edge.base_url}{path}", json=body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"]


def test_echo_is_refused_by_name_until_it_is_implemented(edge: EdgeProcess) -> None:
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    refused = httpx.post(f"{edge.base_url}/v1/completions", json={**body, "echo": True})
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", "echo")
    assert "echo is not supported" in error["message"]
    served = httpx.post(f"{edge.base_url}/v1/completions", json={**body, "echo": False})
    assert served.status_code == 200, served.text


def test_oversized_body_is_413(edge: EdgeProcess) -> None:
    huge = (
        b'{"model": "smollm2-135m", "messages": [{"role": "user", "content": "'
        + (b"x" * (9 * 1024 * 1024))
        + b'"}]}'
    )
    resp = httpx.post(
        f"{edge.base_url}/v1/chat/completions",
        content=huge,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert resp.status_code == 413
    assert "limit" in resp.json()["error"]["message"]


def test_unknown_route_is_openai_style_404(edge: EdgeProcess) -> None:
    resp = httpx.get(f"{edge.base_url}/v1/nothing")
    assert resp.status_code == 404
    assert resp.json()["error"]["type"] == "invalid_request_error"


def test_openai_client_raises_typed_errors_and_server_survives(edge: EdgeProcess) -> None:
    client = edge.client()
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="nope", messages=OK_MSG)  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=[])
    assert not_found.value.status_code == 404
    assert bad.value.status_code == 400
    ok = client.chat.completions.create(model=MODEL, messages=OK_MSG, max_tokens=2)  # type: ignore[arg-type]
    assert ok.choices[0].message is not None


def test_bad_requests_do_not_disturb_a_running_stream(edge: EdgeProcess) -> None:
    client = edge.client()
    result: dict[str, object] = {}

    def long_stream() -> None:
        chunks = list(
            client.chat.completions.create(
                model=MODEL, messages=OK_MSG, max_tokens=64, temperature=0, stream=True
            )
        )  # type: ignore[arg-type]
        result["finish"] = [c.choices[0].finish_reason for c in chunks if c.choices][-1]

    worker = threading.Thread(target=long_stream)
    worker.start()
    for _, body, status, _ in BAD_BODIES[:10]:
        if isinstance(body, dict):
            assert (
                httpx.post(f"{edge.base_url}/v1/chat/completions", json=body).status_code == status
            )
    worker.join(60)
    assert result["finish"] in {"stop", "length"}


# One request at a time and no queue, on either engine: the second request is refused.
ONE_AT_A_TIME = {
    "batched": {"batching": "batched", "sequences": 1},
    "slots": {"batching": "slots", "slots": 1},
}
# An answer that cannot end early: its grammar allows no end token before 2,000
# characters, so the first request holds the edge for all of its 400 tokens (9 s here)
# however loaded the machine is. A free answer to "hi" ended in 0.3 s, and on a busy
# machine the second request arrived after it.
CANNOT_END_EARLY = {
    "type": "json_schema",
    "json_schema": {
        "name": "long",
        "schema": {
            "type": "object",
            "properties": {"story": {"type": "string", "minLength": 2000}},
            "required": ["story"],
        },
    },
}


@pytest.mark.parametrize("engine", sorted(ONE_AT_A_TIME))
def test_queue_full_answers_429_with_retry_after(engine: str) -> None:
    with EdgeProcess(max_queue=0, **ONE_AT_A_TIME[engine]) as edge:
        body = {
            "model": MODEL,
            "messages": OK_MSG,
            "max_tokens": 400,
            "temperature": 0,
            "stream": True,
            "response_format": CANNOT_END_EARLY,
        }
        with httpx.stream("POST", f"{edge.base_url}/v1/chat/completions", json=body) as first:
            assert first.status_code == 200
            second = httpx.post(f"{edge.base_url}/v1/chat/completions", json=_chat())
            assert second.status_code == 429
            assert second.headers["retry-after"] == "1"
            assert second.json()["error"]["code"] == "queue_full"


def test_api_key_is_enforced() -> None:
    with EdgeProcess(api_key="sekret") as edge:
        denied = httpx.post(f"{edge.base_url}/v1/chat/completions", json=_chat())
        assert denied.status_code == 401
        assert denied.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{edge.base_url}/health").status_code == 200
        ok = edge.client(api_key="sekret").chat.completions.create(
            model=MODEL, messages=OK_MSG, max_tokens=2
        )  # type: ignore[arg-type]
        assert ok.choices[0].message is not None
        with pytest.raises(openai.AuthenticationError):
            edge.client(api_key="wrong").models.list()
