"""Disaggregated prefill/decode on the cloud side: a decode worker asks a prefill worker.

Edges never see it. A decode-role worker (``tandem cloud serve --role decode``) that
takes a ``generate`` decides, from the live routing policy's ``disaggregation`` section
(``router.policy.Disaggregation``: always, never, or a threshold of uncached prompt
tokens, as llm-d's router decides), whether the prompt is prefilled remotely::

    decode worker --PrefillRequest--> tandem.v1.worker.<last prefill worker>.prefill (affinity)
                                  or  tandem.v1.cloud.<model>.prefill (queue group "q")
    prefill worker: vLLM request with max_tokens=1; its KV connector saves the KV
    decode worker <--PrefillReply (kv_transfer_params)--
    decode worker: vLLM request with those kv_transfer_params; its connector loads the KV

Failover, all on the decode worker and before any token is streamed (so nothing is
lost or duplicated): no prefill worker, a prefill worker that dies or does not answer
within ``prefill_timeout_s`` (or the request's deadline), or one that answers with an
error → the decode worker prefills the prompt itself. A connector miss (the KV is not
where the consumer looks) is vLLM's own case: the consumer computes what it cannot load
(``kv_load_failure_policy: recompute``).

"Uncached" needs the decode worker's prefix cache, which vLLM does not expose per
prompt; ``PrefixIndex`` estimates it the way vLLM caches, by chained hashes of whole
blocks of the prompts this worker served, in an LRU the size of its KV cache.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import nats.errors
from nats.aio.client import Client

from mesh import subjects
from mesh.errors import ProtocolError
from mesh.protocol import ErrorInfo, GenerateRequest, PrefillReply, PrefillRequest

logger = logging.getLogger(__name__)

# Sessions whose prefill worker a decode worker remembers (affinity), least recent out.
AFFINITY_SESSIONS = 4096


class PrefixIndex:
    """Which whole prompt blocks an engine's prefix cache holds, estimated (LRU by block).

    A block's key chains the keys before it, as vLLM's block hashes do, so a hit means
    the whole prefix up to that block matched.
    """

    def __init__(self, block_size: int, capacity_blocks: int) -> None:
        self.block_size = max(1, block_size)
        self._capacity = max(1, capacity_blocks)
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def cached_tokens(self, tokens: list[int]) -> int:
        """How many leading tokens of ``tokens`` are in the cache (whole blocks); no change."""
        cached = 0
        for key in self._keys(tokens):
            if key not in self._blocks:
                break
            cached += self.block_size
        return cached

    def add(self, tokens: list[int]) -> None:
        """Record that the engine now holds every whole block of ``tokens``."""
        for key in self._keys(tokens):
            self._blocks[key] = None
            self._blocks.move_to_end(key)
        while len(self._blocks) > self._capacity:
            self._blocks.popitem(last=False)

    def _keys(self, tokens: list[int]) -> list[int]:
        keys, previous, size = [], 0, self.block_size
        for start in range(0, len(tokens) - size + 1, size):
            previous = hash((previous, *tokens[start : start + size]))
            keys.append(previous)
        return keys


@dataclass
class PrefillCounts:
    """What disaggregation did on this worker, for ``/metrics`` and tests."""

    served: int = 0  # prefill role: prefills computed for decode workers
    asked: int = 0  # decode role: requests sent to the prefill pool
    transferred: int = 0  # of them, answered: the decode request carried the hand-over
    local: int = 0  # decode role: prompts the policy left to this worker
    fell_back: int = 0  # decode role: asked, but prefilled here (no worker, timeout, error)


@dataclass(frozen=True)
class PrefillOutcome:
    """How a remote prefill went: the reply, or why there is none (then prefill locally)."""

    reply: PrefillReply | None
    failure: str | None = None


class PrefillClient:
    """Asks the prefill pool of one model, keeping each session on one prefill worker."""

    def __init__(self, nc: Client, model: str, timeout_s: float) -> None:
        self._nc = nc
        self._model = model
        self._timeout_s = timeout_s
        self._affinity: OrderedDict[str, str] = OrderedDict()  # session id: prefill worker

    async def prefill(self, request: PrefillRequest) -> PrefillOutcome:
        """Send ``request`` to the session's prefill worker, else to the queue group."""
        budget = self._timeout_s
        if request.deadline is not None:
            budget = min(budget, request.deadline - time.time())
        if budget <= 0:
            return PrefillOutcome(None, "no time left before the deadline")
        started = time.monotonic()
        targets = [subjects.cloud_prefill(self._model)]
        known = self._affinity.get(request.session_id) if request.session_id else None
        if known is not None:
            targets.insert(0, subjects.worker(known, "prefill"))
        failure = "no prefill worker"
        for subject in targets:
            left = budget - (time.monotonic() - started)
            if left <= 0:
                break
            outcome = await self._ask(subject, request, left)
            if outcome.reply is not None:
                self._remember(request.session_id, outcome.reply.worker_id)
                return outcome
            failure = outcome.failure or failure
        return PrefillOutcome(None, failure)

    async def _ask(self, subject: str, request: PrefillRequest, wait_s: float) -> PrefillOutcome:
        try:
            msg = await self._nc.request(subject, request.to_bytes(), timeout=wait_s)
        except nats.errors.NoRespondersError:
            return PrefillOutcome(None, f"no prefill worker on {subject}")
        except nats.errors.TimeoutError:
            return PrefillOutcome(None, f"no prefill reply on {subject} within {wait_s:.1f} s")
        except (nats.errors.Error, OSError) as exc:
            return PrefillOutcome(None, f"prefill request failed: {exc}")
        try:
            error = ErrorInfo.from_service_headers(msg.headers)
            if error is not None:
                return PrefillOutcome(
                    None, f"prefill worker refused ({error.code}): {error.message}"
                )
            reply = PrefillReply.from_bytes(msg.data)
        except ProtocolError as exc:
            return PrefillOutcome(None, f"unusable prefill reply: {exc}")
        if reply.request_id != request.request_id:
            return PrefillOutcome(None, f"prefill reply for another request ({reply.request_id})")
        return PrefillOutcome(reply)

    def _remember(self, session_id: str | None, worker_id: str) -> None:
        if session_id is None:
            return
        self._affinity[session_id] = worker_id
        self._affinity.move_to_end(session_id)
        while len(self._affinity) > AFFINITY_SESSIONS:
            self._affinity.popitem(last=False)


class RemotePrefill:
    """A decode worker's side: when to ask (the live policy), whom (``PrefillClient``), and
    what its own engine holds already (``PrefixIndex``)."""

    def __init__(
        self,
        nc: Client,
        model: str,
        node_id: str,
        *,
        timeout_s: float,
        max_model_len: int,
        index: PrefixIndex,
        counts: PrefillCounts,
    ) -> None:
        from router.live import LivePolicy, PolicyFollower
        from router.policy import RoutingPolicy

        self._client = PrefillClient(nc, model, timeout_s)
        self._max_model_len = max_model_len
        self.index = index
        self._counts = counts
        # The routing policy, followed live like an edge follows it: its disaggregation
        # section says when to ask (the built-in default until one is stored).
        self.policy = LivePolicy(RoutingPolicy())
        self._follower = PolicyFollower(nc, self.policy, node_id)

    async def start(self) -> None:
        """Follow the policy."""
        await self._follower.start()

    async def stop(self) -> None:
        """Stop following it."""
        await self._follower.stop()

    async def kv_for(self, request: GenerateRequest, tokens: list[int]) -> dict[str, Any] | None:
        """Have the prefill pool compute ``tokens``' KV if the policy says so.

        Returns the hand-over for the engine (None: prefill here, or the connector finds
        the KV by its tokens alone). Any failure means this worker prefills itself."""
        counts = self._counts
        if len(tokens) >= self._max_model_len:
            return None  # the engine refuses it with the context-length error
        plan = self.policy.current.disaggregation  # read once per request
        if not plan.wants_remote_prefill(len(tokens), self.index.cached_tokens(tokens)):
            counts.local += 1
            return None
        counts.asked += 1
        outcome = await self._client.prefill(
            PrefillRequest(
                request_id=f"{request.request_id}-prefill",
                session_id=request.session_id,
                model=request.model,
                prompt_token_ids=tokens,
                deadline=request.deadline,
            )
        )
        if outcome.reply is None:
            counts.fell_back += 1
            logger.warning("prefilling %s here: %s", request.request_id, outcome.failure)
            return None
        counts.transferred += 1
        logger.debug("%s prefilled by %s", request.request_id, outcome.reply.worker_id)
        return outcome.reply.kv_transfer_params
