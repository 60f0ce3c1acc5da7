"""Router quality and speed: the learned complexity classifier against rules-only routing.

Quality, on the held-out split of the labels `tandem router train` made (real
llama.cpp edge answers compared with real fp32 cloud answers):

- the classifier's cost/quality curve (threshold sweep) against the rules-only
  family (tools -> cloud, prompt >= L tokens -> cloud, every L; and the same
  without the tools rule), against routing at random, and against
  `prompt < L -> cloud` (short prompts first: a sanity check, since agreement
  counts requests while cost counts tokens);
- at equal agreement with cloud-only answers, the share of cloud tokens the
  classifier saves against the cheapest rule reaching that agreement.

Speed: feature extraction + ONNX scoring (`ComplexityClassifier.score`, the
call the edge makes) over the held-out prompts, several rounds, this process
pinned to one core; p50/p99/max. The load average is printed next to it:
the machine is shared, so compare ratios within a run, not absolute times.

    python -m bench.router_bench                  # shipped model, default label cache
    python -m bench.router_bench --model /tmp/complexity.onnx --rounds 50 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from models import Catalog
from models.settings import tandem_home
from router.classifier import ComplexityClassifier
from router.training.evaluation import (
    cheapest_at,
    classifier_curve,
    operating_point,
    roc_auc,
    rules_curve,
    rules_frontier,
    savings_at,
    short_first_curve,
)
from router.training.fit import FitSettings
from router.training.labels import read_labels
from router.training.pipeline import (
    DEFAULT_RULES_LONG_CONTEXT,
    REPORTED_AGREEMENTS,
    held_out,
    labels_path,
    random_share_at,
    to_examples,
)

CORE = 0


def main() -> None:
    """Run the benchmark and print (and optionally save) its numbers."""
    args = parse_args()
    pair = Catalog.load().default()
    classifier = ComplexityClassifier.load(args.model)
    cache = args.labels or labels_path(tandem_home(), pair, args.max_tokens)
    labels, _ = read_labels(cache)
    test = held_out(list(labels.values()), FitSettings(seed=classifier.info.seed))
    if not test:
        sys.exit(f"no held-out labels in {cache}: run `tandem router train` first")
    os.sched_setaffinity(0, {CORE})
    result = {
        "uptime": Path("/proc/loadavg").read_text().split()[:3],
        "labels": str(cache),
        "quality": quality(classifier, test),
        "latency": latency(classifier, test, args.rounds),
    }
    result["uptime_after"] = Path("/proc/loadavg").read_text().split()[:3]
    print_result(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="ONNX model (default: shipped)")
    parser.add_argument("--labels", type=Path, default=None, help="label cache (JSON lines)")
    parser.add_argument("--max-tokens", type=int, default=32, help="answer length of the labels")
    parser.add_argument("--rounds", type=int, default=20, help="latency rounds over the prompts")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    return parser.parse_args()


def quality(classifier: ComplexityClassifier, test: list) -> dict:
    """ROC-AUC, and cloud tokens at equal agreement: classifier vs rules vs random."""
    scores = [
        classifier.score(lb.prompt_token_ids, has_tools=lb.has_tools, n_messages=lb.n_messages)
        for lb in test
    ]
    examples = to_examples(test)
    ours = classifier_curve(examples, scores)
    rules = rules_frontier(examples)
    short_first = short_first_curve(examples)
    lengths = np.array([e.prompt_tokens for e in examples])
    tools = np.array([e.has_tools for e in examples])
    default = operating_point(examples, tools | (lengths >= DEFAULT_RULES_LONG_CONTEXT))
    tools_only = rules_curve(examples)[-1]  # tools -> cloud, no length cut
    rows = []
    for level in sorted({*REPORTED_AGREEMENTS, round(default.agreement, 4)}):
        saved = savings_at(ours, rules, level)
        ours_req, rules_req = cheapest_at(ours, level, True), cheapest_at(rules, level, True)
        short = cheapest_at(short_first, level)
        if saved is None or ours_req is None or rules_req is None or short is None:
            continue
        rows.append(
            {
                "classifier_requests": ours_req.cloud_request_share,
                "rules_requests": rules_req.cloud_request_share,
                "short_first": short.cloud_token_share,
                "agreement": level,
                "classifier": saved.classifier.cloud_token_share,
                "threshold": saved.classifier.threshold,
                "rules": saved.rules.cloud_token_share,
                "rule_cut_tokens": saved.rules.threshold,
                "random": random_share_at(ours[0].agreement, level),
                "saved_vs_rules": saved.saved_share,
            }
        )
    return {
        "n": len(test),
        "disagree_share": float(np.mean([not lb.agrees for lb in test])),
        "roc_auc": roc_auc([not lb.agrees for lb in test], scores),
        "all_edge": asdict(ours[0]),
        "default_rules": asdict(default),
        "tools_only_rule": asdict(tools_only),
        "at_equal_agreement": rows,
    }


def latency(classifier: ComplexityClassifier, test: list, rounds: int) -> dict:
    """Per-request feature extraction + scoring time, as the edge calls it."""
    requests = [(lb.prompt_token_ids, lb.has_tools, lb.n_messages) for lb in test]
    for ids, has_tools, n in requests[:20]:  # warm-up: first runs allocate
        classifier.score(ids, has_tools=has_tools, n_messages=n)
    wall, cpu = [], []
    for _ in range(rounds):
        for ids, has_tools, n in requests:
            started, started_cpu = time.perf_counter_ns(), time.thread_time_ns()
            classifier.score(ids, has_tools=has_tools, n_messages=n)
            cpu.append(time.thread_time_ns() - started_cpu)
            wall.append(time.perf_counter_ns() - started)
    # Wall time includes being descheduled on a shared machine; this thread's CPU
    # time is the work itself (onnxruntime runs a one-thread session on the caller).
    us, cpu_us = np.array(wall) / 1e3, np.array(cpu) / 1e3
    lengths = [len(ids) for ids, _, _ in requests]
    return {
        "calls": len(us),
        "p50_us": float(np.percentile(us, 50)),
        "p99_us": float(np.percentile(us, 99)),
        "max_us": float(us.max()),
        "cpu_p50_us": float(np.percentile(cpu_us, 50)),
        "cpu_p99_us": float(np.percentile(cpu_us, 99)),
        "prompt_tokens_median": float(np.median(lengths)),
        "prompt_tokens_max": int(max(lengths)),
        "core": CORE,
    }


def print_result(result: dict) -> None:
    """The numbers as a short, readable table."""
    q, lat = result["quality"], result["latency"]
    print(f"load average {' '.join(result['uptime'])} (after: {' '.join(result['uptime_after'])})")
    print(
        f"held out: {q['n']} prompts, {q['disagree_share']:.1%} where edge != cloud; "
        f"ROC-AUC {q['roc_auc']:.3f}"
    )
    d = q["default_rules"]
    print(
        f"all-edge agreement {q['all_edge']['agreement']:.3f}; default rules (tools, >= "
        f"{DEFAULT_RULES_LONG_CONTEXT} tokens): agreement {d['agreement']:.3f} at "
        f"{d['cloud_token_share']:.3f} of cloud tokens"
    )
    print("cloud token share to reach each agreement (then request share, RouteLLM's axis):")
    print(
        f"{'agreement':>9} {'classifier':>10} {'(thresh)':>9} {'rules':>6} {'(L)':>6} "
        f"{'random':>6} {'short-first':>11} {'saved vs rules':>14} {'req: cls':>8} {'rules':>6}"
    )
    for row in q["at_equal_agreement"]:
        print(
            f"{row['agreement']:>9.3f} {row['classifier']:>10.3f} {row['threshold']:>9.3f} "
            f"{row['rules']:>6.3f} {row['rule_cut_tokens']:>6.0f} {row['random']:>6.3f} "
            f"{row['short_first']:>11.3f} {row['saved_vs_rules']:>+14.1%} "
            f"{row['classifier_requests']:>8.3f} {row['rules_requests']:>6.3f}"
        )
    print(
        f"scoring latency (features + ONNX, core {lat['core']}, {lat['calls']} calls, prompts "
        f"median {lat['prompt_tokens_median']:.0f} / max {lat['prompt_tokens_max']} tokens): "
        f"wall p50 {lat['p50_us']:.0f} us, p99 {lat['p99_us']:.0f} us, max {lat['max_us']:.0f} us; "
        f"CPU p50 {lat['cpu_p50_us']:.0f} us, p99 {lat['cpu_p99_us']:.0f} us"
    )


if __name__ == "__main__":
    main()
