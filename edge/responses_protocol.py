"""The OpenAI Responses API wire format (``/v1/responses``): request, response, stream events.

A Responses request is served as a chat: ``ResponsesRequest.to_chat`` turns it,
with the stored conversation it continues, into an
``edge.openai_protocol.ChatCompletionRequest``, so schema and tool-choice
validation, the output constraint, the prompt and the route plan are chat's.
Validation errors of that chat request are reported under the Responses
field names (``text.format.schema``, ``max_output_tokens``, ``tools.0.name``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    SerializerFunctionWrapHandler,
    Tag,
    TypeAdapter,
    ValidationError,
    model_serializer,
    model_validator,
)

from edge.errors import InvalidRequestError
from edge.openai_protocol import (
    MAX_TOKENS_LIMIT,
    ChatCompletionRequest,
    ChatTokenLogprob,
    OpenAIRequest,
    TandemUsage,
)
from mesh.sampling import MAX_TOP_LOGPROBS

# -- input items ---------------------------------------------------------------------


class _Item(BaseModel):
    """Base of input items: unknown fields (``id``, ``status`` of resent output) are kept."""

    model_config = ConfigDict(extra="allow", frozen=True)


class TextPart(_Item):
    """A text content part; output text resent as input is text too."""

    type: Literal["input_text", "output_text"]
    text: str


def _parts(value: Any) -> Any:
    """A plain string is one text part (validating the list form alone keeps a 400's
    field path free of the union's branches)."""
    return [{"type": "input_text", "text": value}] if isinstance(value, str) else value


def _text(parts: Sequence[TextPart]) -> str:
    return "".join(p.text for p in parts)


Parts = Annotated[list[TextPart], BeforeValidator(_parts)]


class MessageItem(_Item):
    """A message of the conversation (``type`` may be left out, as OpenAI allows)."""

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Parts


class FunctionCallItem(_Item):
    """A function call the model made."""

    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str
    arguments: str


class FunctionCallOutputItem(_Item):
    """The client's result of a function call."""

    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: Parts


def _item_type(item: Any) -> str:
    kind = item.get("type", "message") if isinstance(item, dict) else getattr(item, "type", None)
    return kind if isinstance(kind, str) else "message"


InputItem = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(
        _item_type,
        custom_error_type="input_item_type",
        custom_error_message="an input item is a message, a function_call or a "
        "function_call_output (other item types are not supported here)",
    ),
]
INPUT_ITEM: TypeAdapter[InputItem] = TypeAdapter(InputItem)


def chat_messages(items: Iterable[InputItem]) -> list[dict[str, Any]]:
    """Chat messages of a conversation's items: a model's function calls join its
    assistant message, a call's output is a ``tool`` message."""
    messages: list[dict[str, Any]] = []
    calls: set[str] = set()
    for item in items:
        if isinstance(item, MessageItem):
            messages.append({"role": item.role, "content": _text(item.content)})
        elif isinstance(item, FunctionCallItem):
            calls.add(item.call_id)
            call = {"id": item.call_id, "type": "function",
                    "function": {"name": item.name, "arguments": item.arguments}}  # fmt: skip
            if messages and messages[-1]["role"] == "assistant":
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            if item.call_id not in calls:
                raise InvalidRequestError(
                    f"input: no function_call with call_id {item.call_id!r} precedes its "
                    "function_call_output; pass previous_response_id, or send the call too",
                    param="input",
                )
            messages.append(
                {"role": "tool", "tool_call_id": item.call_id, "content": _text(item.output)}
            )
    return messages


# -- request -------------------------------------------------------------------------


def _message_items(value: Any) -> Any:
    """``input`` as a string is one user message."""
    return [{"role": "user", "content": value}] if isinstance(value, str) else value


class FunctionTool(BaseModel):
    """A Responses function tool: the chat tool's function fields, flat."""

    model_config = ConfigDict(extra="allow")

    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def to_chat(self) -> dict[str, Any]:
        """The chat form, ``{"type": "function", "function": {...}}``."""
        fields = {"name", "description", "parameters", "strict"}
        return {"type": "function", "function": self.model_dump(include=fields, exclude_none=True)}


class FunctionChoice(BaseModel):
    """``tool_choice`` naming one function."""

    type: Literal["function"]
    name: str


class TextFormat(BaseModel):
    """``text.format``: free text, any JSON object, or JSON following a schema."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> TextFormat:
        if self.type == "json_schema" and self.schema_ is None:
            raise ValueError("text.format type 'json_schema' needs a 'schema'")
        return self

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None}

    def to_chat(self) -> dict[str, Any]:
        """The chat ``response_format``."""
        if self.type != "json_schema":
            return {"type": self.type}
        fields = {"name", "description", "schema_", "strict"}
        spec = self.model_dump(include=fields, by_alias=True, exclude_none=True)
        return {"type": "json_schema", "json_schema": spec}


class TextConfig(BaseModel):
    """``text``: the output's format (``verbosity`` is accepted and ignored)."""

    model_config = ConfigDict(extra="allow")

    format: TextFormat = Field(default_factory=lambda: TextFormat.model_validate({"type": "text"}))


# ``include`` values of the Responses API. Only the output text's logprobs apply here;
# the others concern tools and inputs this edge does not have and are accepted as no-ops.
Includable = Literal[
    "file_search_call.results",
    "web_search_call.results",
    "web_search_call.action.sources",
    "message.input_image.image_url",
    "computer_call_output.output.image_url",
    "code_interpreter_call.outputs",
    "reasoning.encrypted_content",
    "message.output_text.logprobs",
]
TEXT_LOGPROBS: Includable = "message.output_text.logprobs"


class ResponsesRequest(OpenAIRequest):
    """``POST /v1/responses``."""

    model: str = Field(min_length=1)
    # A string is one user message; the schema shows both forms.
    input: Annotated[
        list[InputItem],
        BeforeValidator(_message_items, json_schema_input_type=str | list[InputItem]),
    ]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice = "auto"
    parallel_tool_calls: bool | None = None
    text: TextConfig = TextConfig()
    max_output_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = None
    top_p: float | None = None
    include: list[Includable] | None = None
    # Alternatives per token of the output text's logprobs (with ``include`` asking for them).
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None

    def wants_logprobs(self) -> bool:
        """Whether the output text carries its tokens' logprobs (``include``)."""
        return TEXT_LOGPROBS in (self.include or ())

    def to_chat(self, history: Sequence[InputItem] = ()) -> ChatCompletionRequest:
        """The chat request this turn is: ``instructions``, then the stored conversation
        (``history``), then this input. A 400 names the Responses field at fault."""
        system = [{"role": "system", "content": self.instructions}] if self.instructions else []
        choice = self.tool_choice
        logprobs = self.wants_logprobs()
        chat = {
            "model": self.model,
            "messages": system + chat_messages([*history, *self.input]),
            "tools": [t.to_chat() for t in self.tools] if self.tools else None,
            "tool_choice": {"type": "function", "function": {"name": choice.name}}
            if isinstance(choice, FunctionChoice)
            else choice,
            "parallel_tool_calls": self.parallel_tool_calls,
            "response_format": self.text.format.to_chat(),
            "max_completion_tokens": self.max_output_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            # As vLLM's Responses API: top_logprobs counts only when logprobs are included.
            "logprobs": logprobs or None,
            "top_logprobs": self.top_logprobs if logprobs else None,
            "user": self.user,
            # A streamed response wants the cloud's tokens as they come (serving.serve_cloud).
            "stream": self.stream,
        }
        try:
            return ChatCompletionRequest.model_validate(
                {k: v for k, v in chat.items() if v is not None}
            )
        except ValidationError as exc:
            first = exc.errors()[0]
            param = _responses_param(".".join(str(p) for p in first["loc"])) or None
            msg = first["msg"].removeprefix("Value error, ")  # as the chat handler reports it
            message = f"{param}: {msg}" if param else msg
            raise InvalidRequestError(message, param=param) from exc


# Chat field paths and the Responses fields they came from, first match wins.
_PARAMS = (
    (re.compile(r"^messages\b.*"), "input"),
    (re.compile(r"^response_format(\.json_schema)?\b"), "text.format"),
    (re.compile(r"^max_completion_tokens\b"), "max_output_tokens"),
    (re.compile(r"^tools\.(\d+)\.function\b"), r"tools.\1"),
    (re.compile(r"^tool_choice\.function\b"), "tool_choice"),
)


def _responses_param(chat_loc: str) -> str:
    for pattern, name in _PARAMS:
        if pattern.match(chat_loc):
            return pattern.sub(name, chat_loc, count=1)
    return chat_loc


# -- response ------------------------------------------------------------------------


class OutputText(BaseModel):
    """An ``output_text`` content part; ``logprobs`` (when included) spell its text."""

    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = []
    logprobs: list[ChatTokenLogprob] = []


class DeltaTopLogprob(BaseModel):
    """An alternative token in a text event's ``logprobs`` (no bytes, as OpenAI sends it)."""

    token: str
    logprob: float


class DeltaLogprob(BaseModel):
    """A token's entry in ``response.output_text.delta`` / ``.done`` ``logprobs``."""

    token: str
    logprob: float
    top_logprobs: list[DeltaTopLogprob] = []

    @classmethod
    def of(cls, entry: ChatTokenLogprob) -> DeltaLogprob:
        """The event form of an output text's logprob entry."""
        top = [DeltaTopLogprob(token=t.token, logprob=t.logprob) for t in entry.top_logprobs]
        return cls(token=entry.token, logprob=entry.logprob, top_logprobs=top)


ItemStatus = Literal["in_progress", "completed", "incomplete"]


class OutputMessage(BaseModel):
    """The assistant's message in ``output``."""

    type: Literal["message"] = "message"
    id: str
    role: Literal["assistant"] = "assistant"
    status: ItemStatus
    content: list[OutputText]


class FunctionToolCall(BaseModel):
    """A function call in ``output``; ``call_id`` pairs it with its output."""

    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: ItemStatus


OutputItem = OutputMessage | FunctionToolCall


class InputTokensDetails(BaseModel):
    """``usage.input_tokens_details``."""

    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    """``usage.output_tokens_details`` (this model does not reason apart)."""

    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    """Token counts of one response, with Tandem's route facts in ``tandem``."""

    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails = OutputTokensDetails()
    total_tokens: int
    tandem: TandemUsage | None = None


class IncompleteDetails(BaseModel):
    """Why a response stopped early."""

    reason: Literal["max_output_tokens"]


class ResponseError(BaseModel):
    """Why a response failed (streamed responses only: others answer an HTTP error)."""

    code: str
    message: str


ResponseStatus = Literal["in_progress", "completed", "incomplete", "failed"]


class ResponseDeleted(BaseModel):
    """``DELETE /v1/responses/{id}``'s answer (OpenAI's shape)."""

    id: str
    object: Literal["response"] = "response"
    deleted: Literal[True] = True


class ResponseObject(BaseModel):
    """The ``response`` object: ``POST /v1/responses``, ``GET /v1/responses/{id}``."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: ResponseStatus
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None
    max_output_tokens: int | None
    metadata: dict[str, str]
    model: str
    output: list[OutputItem]
    parallel_tool_calls: bool
    previous_response_id: str | None
    store: bool
    temperature: float | None
    text: TextConfig
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice
    tools: list[FunctionTool]
    top_logprobs: int | None = None
    top_p: float | None
    usage: ResponseUsage | None = None
    user: str | None

    def dump(self) -> dict[str, Any]:
        """The JSON body (``schema`` under its wire name)."""
        return self.model_dump(mode="json", by_alias=True)


# -- stream events (each SSE is ``event: <type>`` and ``data: <the event>``) ---------------


class StreamEvent(BaseModel):
    """Base of the stream's events; ``sequence_number`` counts from 0 in each stream."""

    type: str
    sequence_number: int


class ResponseEvent(StreamEvent):
    """``response.created`` / ``.in_progress`` / ``.completed`` / ``.incomplete`` / ``.failed``."""

    response: ResponseObject


class OutputItemEvent(StreamEvent):
    """``response.output_item.added`` / ``.done``."""

    output_index: int
    item: OutputItem


class ContentPartEvent(StreamEvent):
    """``response.content_part.added`` / ``.done``."""

    item_id: str
    output_index: int
    content_index: int = 0
    part: OutputText


class TextDeltaEvent(StreamEvent):
    """``response.output_text.delta``."""

    type: Literal["response.output_text.delta"] = "response.output_text.delta"
    item_id: str
    output_index: int
    content_index: int = 0
    delta: str
    logprobs: list[DeltaLogprob] = []


class TextDoneEvent(StreamEvent):
    """``response.output_text.done``: the part's whole text."""

    type: Literal["response.output_text.done"] = "response.output_text.done"
    item_id: str
    output_index: int
    content_index: int = 0
    text: str
    logprobs: list[DeltaLogprob] = []


class ArgumentsDeltaEvent(StreamEvent):
    """``response.function_call_arguments.delta`` (a call's arguments arrive whole)."""

    type: Literal["response.function_call_arguments.delta"] = (
        "response.function_call_arguments.delta"
    )
    item_id: str
    output_index: int
    delta: str


class ArgumentsDoneEvent(StreamEvent):
    """``response.function_call_arguments.done``."""

    type: Literal["response.function_call_arguments.done"] = "response.function_call_arguments.done"
    item_id: str
    output_index: int
    name: str
    arguments: str


class ErrorEvent(StreamEvent):
    """``error``: the answer failed after the stream began (``response.failed`` follows)."""

    type: Literal["error"] = "error"
    code: str | None
    message: str
    param: str | None
