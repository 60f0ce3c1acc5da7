"""The OpenAI HTTP wire format the edge speaks: requests, responses, stream chunks.

Request models accept unknown fields (clients send vendor extensions) and log
them; every value we act on is validated here, so the handlers see only sane
requests. Conversion to the engine's form is a method on the request model.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import replace
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from edge.sampling import SamplingParams
from mesh.grammar import MAX_TOOL_CALLS, schema_problem, tool_call_schema
from mesh.protocol import OutputConstraint
from mesh.sampling import MAX_TOP_LOGPROBS

logger = logging.getLogger(__name__)

# Upper bounds that turn absurd requests into clear 400s instead of memory blow-ups.
MAX_TOKENS_LIMIT = 1_000_000
MAX_STOP_SEQUENCES = 16
MAX_MESSAGES = 10_000
# ``n``: a hard ceiling; the daemon's own bound (``EdgeSettings.max_n``) is usually lower.
MAX_N = 128


class FieldError(ValueError):
    """A request check across fields, naming the one at fault (it becomes the 400's
    ``param``; pydantic gives errors of model-level checks no location)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


class OpenAIRequest(BaseModel):
    """Base for request bodies: unknown fields are kept and logged, not rejected."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _log_unknown_fields(self) -> OpenAIRequest:
        if self.model_extra:
            logger.debug("ignoring unsupported request fields: %s", sorted(self.model_extra))
        return self


class FunctionCall(BaseModel):
    """A function call inside an assistant message's ``tool_calls``."""

    name: str
    arguments: str


class ToolCall(BaseModel):
    """One tool call made by the assistant."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    """One message of a conversation."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        """The message's text; content parts of type ``text`` are joined."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported on this model")
            parts.append(part["text"])
        return "".join(parts)

    def to_template_dict(self) -> dict[str, Any]:
        """The plain dict the chat template renders (content flattened to text)."""
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role}
        out["content"] = self.text()
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = [tc.model_dump() for tc in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class FunctionDefinition(BaseModel):
    """The function part of a tool definition."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(BaseModel):
    """A tool the model may call."""

    type: Literal["function"]
    function: FunctionDefinition


StopSequence = Annotated[str, Field(min_length=1)]


class NamedFunction(BaseModel):
    """The function a ``tool_choice`` names (OpenAI sends ``{"name": ...}``)."""

    name: str = Field(min_length=1)


class NamedToolChoice(BaseModel):
    """``tool_choice`` naming one function."""

    type: Literal["function"]
    function: NamedFunction


class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``: the schema the answer must follow."""

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _check_schema(cls, schema: dict[str, Any]) -> dict[str, Any]:
        problem = schema_problem(schema)
        if problem is not None:
            raise ValueError(problem)
        return schema


class ResponseFormat(BaseModel):
    """``response_format``: free text, any JSON object, or JSON following a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format type 'json_schema' needs a json_schema object")
        return self


class StreamOptions(BaseModel):
    """``stream_options``: only ``include_usage`` is meaningful."""

    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class _SamplingFields(OpenAIRequest):
    """Fields shared by chat and text completions."""

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = None
    # Non-empty in the schema too, so that fuzzers and client generators know.
    stop: StopSequence | list[StopSequence] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N, description="choices to generate")
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty strings")
        return v

    def stop_list(self) -> list[str]:
        """``stop`` as a list."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def requested_max_tokens(self) -> int | None:
        """The completion budget the client asked for, if any."""
        return self.max_tokens

    def to_sampling_params(self, *, default_max_tokens: int) -> SamplingParams:
        """The engine's sampling parameters for this request."""
        return SamplingParams(
            max_tokens=self.requested_max_tokens() or default_max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            seed=self.seed,
            stop=self.stop_list(),
            logprobs=self.logprobs_k(),
        )

    def logprobs_k(self) -> int | None:
        """How many top alternatives each token's logprobs carry; None: no logprobs."""
        return None

    def choice_seed(self, index: int) -> int | None:
        """The seed of choice ``index`` of ``n``: each choice draws its own numbers (a
        seeded request stays reproducible, and its choices still differ)."""
        return None if self.seed is None else self.seed + index

    def include_usage(self) -> bool:
        """Whether a streamed answer ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    tools: list[ToolDefinition] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("top_logprobs")
    @classmethod
    def _needs_logprobs(cls, top: int | None, info: ValidationInfo) -> int | None:
        if top is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return top

    def logprobs_k(self) -> int | None:
        """``top_logprobs`` alternatives per token when ``logprobs`` is on."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens`` wins over the deprecated ``max_tokens``."""
        return self.max_completion_tokens or self.max_tokens

    def active_tools(self) -> list[dict[str, Any]] | None:
        """The tools the template should show the model (none when tool_choice is 'none')."""
        shown = self.shown_tools
        return None if shown is None else list(shown)

    @cached_property
    def shown_tools(self) -> tuple[dict[str, Any], ...] | None:
        """``active_tools``, dumped once: a request asks for them up to seven times (the
        checks, the features, the plan, the prompt, the answer, the cloud request), and
        the dumps were ~3% of a scale-run edge's CPU (py-spy, issue 19)."""
        if not self.tools or self.tool_choice == "none":
            return None
        tools = [t.model_dump(exclude_none=True) for t in self.tools]
        if isinstance(self.tool_choice, NamedToolChoice):
            wanted = self.tool_choice.function.name
            tools = [t for t in tools if t["function"]["name"] == wanted]
        return tuple(tools)

    def to_sampling_params(self, *, default_max_tokens: int) -> SamplingParams:
        """The engine's sampling parameters, with the answer's output constraint."""
        params = super().to_sampling_params(default_max_tokens=default_max_tokens)
        return replace(params, constraint=self.output_constraint)

    @cached_property
    def output_constraint(self) -> OutputConstraint | None:
        """How decoding is constrained: enforced tool calls win over ``response_format``,
        which wins over ``strict`` tools under ``auto`` (constrained once a call starts).

        Cached: the plan, the edge's sampling and the cloud's wire request all ask."""
        # One call unless parallel calls are asked for explicitly: under a grammar a
        # small model repeats its call rather than stop after the first.
        calls = MAX_TOOL_CALLS if self.parallel_tool_calls else 1
        if self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice):
            tools = self.active_tools() or []
            return OutputConstraint(json_schema=tool_call_schema(tools), tool_calls=calls)
        spec = self.response_format
        if spec is None or spec.type == "text":
            if self.strict_tools_under_auto():
                schema = tool_call_schema(self.active_tools() or [], strict_only=True)
                return OutputConstraint(json_schema=schema, tool_calls=calls, lazy=True)
            return None
        if spec.type == "json_object" or spec.json_schema is None:
            return OutputConstraint()
        return OutputConstraint(json_schema=spec.json_schema.schema_)

    def strict_tools_under_auto(self) -> bool:
        """Whether the model may call tools freely and some of them are ``strict``."""
        auto = self.tool_choice in (None, "auto")
        return auto and any(t.function.strict for t in self.tools or [])

    @model_validator(mode="after")
    def _check_tool_choice(self) -> ChatCompletionRequest:
        if isinstance(self.tool_choice, NamedToolChoice):
            wanted = self.tool_choice.function.name
            names = {t.function.name for t in self.tools or []}
            if wanted not in names:
                raise FieldError("tool_choice", f"names function {wanted!r}, which is not in tools")
        if self.tool_choice == "required" and not self.tools:
            raise FieldError("tool_choice", "'required' needs at least one tool in tools")
        enforced = self.tool_choice == "required" or isinstance(self.tool_choice, NamedToolChoice)
        shown = {t["function"]["name"] for t in self.active_tools() or []}
        for i, tool in enumerate(self.tools or []):  # these parameters become a grammar
            function = tool.function
            if function.name not in shown or not (enforced or function.strict):
                continue
            problem = schema_problem(function.parameters or {})
            if problem is not None:
                why = "the tool is strict" if function.strict else "tool_choice enforces it"
                raise FieldError(f"tools.{i}.function.parameters", f"{problem} ({why})")
        return self


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions`` (one prompt string)."""

    prompt: str | list[int] = Field(min_length=1)
    echo: bool = False  # accepted so that ``echo: true`` gets a clear 400, not silence
    # The legacy API's logprobs: how many alternatives per token (OpenAI allows up to 5).
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    def logprobs_k(self) -> int | None:
        """``logprobs`` alternatives per token, when asked for."""
        return self.logprobs

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool) -> bool:
        if echo:
            raise ValueError("echo is not supported: send echo: false, or leave it out")
        return echo


# ---------------------------------------------------------------------------
# Responses


def new_id(prefix: str) -> str:
    """A unique OpenAI-style id such as ``chatcmpl-…``."""
    return f"{prefix}-{uuid.uuid4().hex}"


def unix_now() -> int:
    """Seconds since the epoch, as OpenAI's ``created`` field."""
    return int(time.time())


class SpeculativeUsage(BaseModel):
    """Drafting statistics of a speculative answer."""

    drafted: int
    accepted: int
    verify_rounds: int
    acceptance_rate: float
    tokens_per_verify: float
    # Rounds whose draft was drafted during the previous verification's round trip.
    pipelined_rounds: int = 0
    fell_back_to_edge: bool = False


class EscalationUsage(BaseModel):
    """An edge answer that continued on a stronger route when the edge grew unsure."""

    at_token: int  # completion tokens the edge had produced
    mean_logprob: float  # over the window that triggered it
    to: str  # the route that finished the answer


class CloudFallbackUsage(BaseModel):
    """A cloud answer that lost every worker midway and was finished on the edge."""

    at_token: int  # completion tokens the cloud had produced
    error: str  # why the cloud route gave up
    to: str = "edge-fallback"


class TandemUsage(BaseModel):
    """Where the answer ran and what it cost; nested in ``usage.tandem``."""

    route: str = "edge"
    node_id: str
    queue_ms: float = 0.0
    cached_prompt_tokens: int = 0
    worker_id: str | None = None
    rule: str | None = None
    speculative: SpeculativeUsage | None = None
    # A simulated engine produced the answer (scale runs), and its modelled engine time.
    simulated: bool = False
    simulated_engine_ms: float | None = None
    escalation: EscalationUsage | None = None
    fallback: CloudFallbackUsage | None = None


class PromptTokensDetails(BaseModel):
    """OpenAI's ``usage.prompt_tokens_details``."""

    cached_tokens: int = 0


class Usage(BaseModel):
    """Token counts of one answer."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = PromptTokensDetails()
    tandem: TandemUsage | None = None


class TopLogprob(BaseModel):
    """One alternative token at a position, as OpenAI's ``top_logprobs`` entries."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    """One generated token's ``logprobs.content`` entry."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    """A chat choice's ``logprobs``."""

    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    """A text completion choice's ``logprobs`` (the legacy shape)."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class ChatMessageOut(BaseModel):
    """The assistant message of a non-streamed answer."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    """One choice of a non-streamed chat answer."""

    index: int = 0
    message: ChatMessageOut
    finish_reason: str | None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletion(BaseModel):
    """A non-streamed chat answer."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ToolCallDelta(BaseModel):
    """A tool call fragment in a stream chunk (we send each call whole)."""

    index: int
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatDelta(BaseModel):
    """The ``delta`` of a chat stream chunk."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(BaseModel):
    """One choice of a chat stream chunk."""

    index: int = 0
    delta: ChatDelta
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    """One ``chat.completion.chunk`` server-sent event."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionChoice(BaseModel):
    """One choice of a text completion (streamed or not)."""

    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class Completion(BaseModel):
    """A text completion answer or stream chunk (``object`` tells which)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models``."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tandem"
    max_model_len: int | None = None


class ModelList(BaseModel):
    """``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]
