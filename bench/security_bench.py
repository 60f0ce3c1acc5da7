"""What security costs: the cloud route with identities, TLS and API keys on, versus off.

Two meshes, each edge -> NATS -> one real vLLM worker, the same greedy streaming
requests through the official openai client (``bench.cloud_bench``'s runner):

1. **open**: no NATS credentials, plain TCP, no API key on the edge;
2. **secure**: every node with its own nkey identity and least-privilege
   permissions (``tandem mesh``), TLS on every NATS link (a dev CA), and the edge
   checking a per-tenant API key with rpm/tpm limits (``tandem keys``, a key file).

The meshes run one after the other (one vLLM on the machine at a time) in the order
open, secure, open, so a drift of the machine shows as a difference between the two
open runs. Then the edge's key check and rate limiting alone, in this process:
CPU time per request at p50/p99 over many calls.

    python -m bench.security_bench --requests 32 --max-tokens 64 --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.cloud_bench import _load, _median, _spread, chats, client_run
from edge.api_keys import Authenticator, KeyRing, new_key, write_key_file
from edge.rate_limits import RateLimiter
from mesh.security import MeshDir
from tandem.local import EdgeProcess, WorkerProcess, local_nats, wait_heard
from tandem.supervisor import Supervisor

CONCURRENCY = (1, 16)
KV_CACHE_GB = 1


@contextmanager
def _mesh(secure: bool, tmp: Path) -> Iterator[tuple[EdgeProcess, str]]:
    """An edge, a hub and a worker; yields the edge and the API key to call it with."""
    nats_options: dict[str, Any] = {}
    worker_options: dict[str, Any] = {"kv_cache_gb": KV_CACHE_GB}
    edge_options: dict[str, Any] = {}
    secret = "unused"
    if secure:
        mesh = MeshDir(tmp / "mesh")
        mesh.init(tls_hosts=["127.0.0.1", "localhost"])
        mesh.add("bench-edge", "edge")
        mesh.add("bench-worker", "worker")
        nats_options["config"] = mesh.auth_conf
        worker_options |= {"nats_creds": mesh.creds("bench-worker"), "nats_tls_ca": mesh.tls_ca}
        secret, key = new_key("bench", rpm=1_000_000, tpm=1_000_000_000)
        write_key_file(tmp / "keys.json", [key])
        edge_options |= {
            "nats_creds": mesh.creds("bench-edge"),
            "nats_tls_ca": mesh.tls_ca,
            "api_keys_file": tmp / "keys.json",
        }
    with Supervisor() as supervisor, local_nats(supervisor, **nats_options) as nats:
        worker = WorkerProcess(nats, "bench-worker", supervisor=supervisor, **worker_options)
        worker.start()
        worker.wait_ready()
        with EdgeProcess(
            supervisor=supervisor, nats_url=nats.url, node_id="bench-edge", **edge_options
        ) as edge:
            wait_heard(edge)
            yield edge, secret
        worker.terminate()


def mesh_runs(
    secure: bool, prompts: list[list[dict[str, str]]], n: int, repeats: int
) -> dict[str, list[dict[str, float]]]:
    name = "secure" if secure else "open"
    with tempfile.TemporaryDirectory() as tmp, _mesh(secure, Path(tmp)) as (edge, secret):

        async def go() -> dict[str, list[dict[str, float]]]:
            async with edge.async_client(api_key=secret, timeout=600) as client:
                route = {"x-tandem-route": "cloud"}
                await client_run(client, prompts[:2], 4, 1, route)  # warm up
                out: dict[str, list[dict[str, float]]] = {f"{name} c={c}": [] for c in CONCURRENCY}
                for _ in range(repeats):
                    for c in CONCURRENCY:
                        out[f"{name} c={c}"].append(await client_run(client, prompts, n, c, route))
                return out

        return asyncio.run(go())


def key_check_cost(calls: int = 200_000) -> dict[str, float]:
    """CPU time of one request's key check and rate limiting (the edge's ``_authorize``)."""
    keys = [new_key(f"tenant-{i}", rpm=10**9, tpm=10**12) for i in range(1000)]
    auth = Authenticator(ring=KeyRing(k for _, k in keys))
    limiter = RateLimiter()
    headers = [f"Bearer {secret}" for secret, _ in keys]
    samples = []
    clock = time.thread_time_ns
    for i in range(calls):
        header = headers[i % len(headers)]
        t0 = clock()
        principal = auth.principal(header)
        assert principal.key is not None
        limiter.admit(principal.key)
        samples.append(clock() - t0)
    samples.sort()
    return {
        "p50_us": samples[len(samples) // 2] / 1000,
        "p99_us": samples[int(len(samples) * 0.99)] / 1000,
        "mean_us": statistics.fmean(samples) / 1000,
    }


async def _stream_rounds(
    url: str, creds: tuple[Path, Path] | None, ca: Path | None, rounds: int, tokens: int
) -> list[tuple[float, float]]:
    """(first message, whole stream) seconds of ``rounds`` request-and-stream exchanges:
    the cloud route's shape (a request, ``tokens`` messages to the requester's inbox)."""
    from mesh.connection import MeshCredentials, connect

    edge_creds = MeshCredentials(creds[0], ca) if creds else MeshCredentials(None, None)
    worker_creds = MeshCredentials(creds[1], ca) if creds else MeshCredentials(None, None)
    edge = await connect(url, name="bench-edge", credentials=edge_creds)
    worker = await connect(url, name="bench-worker", credentials=worker_creds)
    subject = "tandem.v1.cloud.bench.generate"

    async def serve(msg: Any) -> None:
        stream_to = msg.data.decode()
        for i in range(tokens):
            await worker.publish(stream_to, b'{"token": %d}' % i)
        await msg.respond(b"ok")

    await worker.subscribe(subject, queue="q", cb=serve)
    await worker.flush()
    out = []
    try:
        for _ in range(rounds):
            inbox = edge.new_inbox()
            got: list[float] = []
            done = asyncio.Event()

            async def on_token(msg: Any, got: list[float] = got, done: Any = done) -> None:
                got.append(time.perf_counter())
                if len(got) == tokens:
                    done.set()

            sub = await edge.subscribe(inbox, cb=on_token)
            t0 = time.perf_counter()
            await edge.request(subject, inbox.encode(), timeout=5)
            await asyncio.wait_for(done.wait(), 5)
            out.append((got[0] - t0, got[-1] - t0))
            await sub.unsubscribe()
    finally:
        await edge.close()
        await worker.close()
    return out


def nats_cost(rounds: int = 300, tokens: int = 64) -> dict[str, dict[str, float]]:
    """The mesh layer alone, open vs identities + permissions + TLS, interleaved in
    blocks so a drift of the machine touches both: no engine, no HTTP."""
    from mesh.server import EmbeddedNats

    with tempfile.TemporaryDirectory() as tmp:
        mesh = MeshDir(Path(tmp) / "mesh")
        mesh.init(tls_hosts=["127.0.0.1", "localhost"])
        mesh.add("bench-edge", "edge")
        mesh.add("bench-worker", "worker")
        creds = (mesh.creds("bench-edge"), mesh.creds("bench-worker"))
        samples: dict[str, list[tuple[float, float]]] = {"open": [], "secure": []}
        with EmbeddedNats() as open_hub, EmbeddedNats(config=mesh.auth_conf) as secure_hub:
            for _ in range(6):
                samples["open"] += asyncio.run(
                    _stream_rounds(open_hub.url, None, None, rounds // 6, tokens)
                )
                samples["secure"] += asyncio.run(
                    _stream_rounds(secure_hub.url, creds, mesh.tls_ca, rounds // 6, tokens)
                )
    out = {}
    for mode, pairs in samples.items():
        firsts = sorted(p[0] for p in pairs)
        wholes = sorted(p[1] for p in pairs)
        out[mode] = {
            "first_p50_ms": firsts[len(firsts) // 2] * 1000,
            "first_p99_ms": firsts[int(len(firsts) * 0.99)] * 1000,
            "stream_p50_ms": wholes[len(wholes) // 2] * 1000,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--keys-only", action="store_true", help="only the key-check cost")
    parser.add_argument(
        "--mesh-only", action="store_true", help="the key check and the NATS layer, no engine"
    )
    args = parser.parse_args()
    load_before = _load()
    cost = key_check_cost()
    print(
        f"key check + rate limit, CPU per request: p50 {cost['p50_us']:.1f} us, "
        f"p99 {cost['p99_us']:.1f} us (target < 50), mean {cost['mean_us']:.1f} us"
    )
    if args.keys_only:
        print(f"load average {load_before}")
        return
    layer = nats_cost()
    for mode, figures in layer.items():
        print(
            f"NATS request + {64} streamed messages, {mode}: first message p50 "
            f"{figures['first_p50_ms']:.3f} ms, p99 {figures['first_p99_ms']:.3f} ms; "
            f"whole stream p50 {figures['stream_p50_ms']:.3f} ms"
        )
    added = layer["secure"]["first_p50_ms"] - layer["open"]["first_p50_ms"]
    print(f"identities + permissions + TLS add {added:+.3f} ms to the first message at p50")
    if args.mesh_only:
        print(f"load average before {load_before}, after {_load()}")
        return
    prompts, n = chats(args.requests), args.max_tokens
    results: dict[str, list[dict[str, float]]] = {}
    first_open = mesh_runs(False, prompts, n, args.repeats)
    results |= mesh_runs(True, prompts, n, args.repeats)
    second_open = mesh_runs(False, prompts, n, args.repeats)
    for name in first_open:
        results[name] = first_open[name] + second_open[name]
    print(f"requests={args.requests} max_tokens={n} repeats={args.repeats} (greedy, streaming)")
    print(f"load average before {load_before}, after {_load()} (1, 5, 15 min)")
    print(f"{'mode':<14}{'TTFT p50 ms':>12}{'spread':>14}{'tok/s':>9}{'spread':>14}")
    for name in sorted(results):
        runs = results[name]
        print(
            f"{name:<14}{_median(runs, 'ttft_p50_ms'):>12.1f}{_spread(runs, 'ttft_p50_ms'):>14}"
            f"{_median(runs, 'tokens_per_s'):>9.1f}{_spread(runs, 'tokens_per_s'):>14}"
        )
    for c in CONCURRENCY:
        on, off = results[f"secure c={c}"], results[f"open c={c}"]
        added = _median(on, "ttft_p50_ms") - _median(off, "ttft_p50_ms")
        share = _median(on, "tokens_per_s") / _median(off, "tokens_per_s")
        drift = _median(first_open[f"open c={c}"], "tokens_per_s") / _median(
            second_open[f"open c={c}"], "tokens_per_s"
        )
        print(
            f"c={c}: security-added TTFT p50 {added:+.2f} ms (target < 1); throughput "
            f"{share:.1%} of open (target >= 97%); open run 1 / run 2 throughput {drift:.1%}"
        )


if __name__ == "__main__":
    main()
