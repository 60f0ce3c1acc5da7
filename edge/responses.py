"""The Responses API on the edge: stored conversations, and chat answers as responses.

A ``POST /v1/responses`` is served as a chat (``ResponsesRequest.to_chat``) on
chat's route plan and serving layer; this module turns that chat's answer into
the ``response`` object, whole (``from_chat``, from ``edge.answers.collect_chat``)
or as the documented event stream (``stream_response``, from ``edge.answers.chat_pieces``,
the streaming loop chat's chunks come from too):

    response.created, response.in_progress,
    [response.output_item.added (message), response.content_part.added,
     response.output_text.delta ..., response.output_text.done,
     response.content_part.done, response.output_item.done]
    [response.output_item.added (function_call), response.function_call_arguments.delta,
     response.function_call_arguments.done, response.output_item.done] ...
    response.completed | response.incomplete   (error, response.failed if it breaks)

With ``include: ["message.output_text.logprobs"]`` the output text carries its tokens'
logprobs (``top_logprobs`` alternatives each), matched to the text by bytes, so
they spell it; tool-call markup's tokens are no text and have none.

``ResponseStore`` keeps stored responses (an LRU of ``STORE_SIZE``), each with its
whole conversation, so ``previous_response_id`` continues it.
"""

from __future__ import annotations

import itertools
import uuid
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, Literal

from edge.answers import AnswerContext, AnswerText, chat_pieces
from edge.errors import EdgeError, ResponseNotFoundError
from edge.generation import Events
from edge.openai_protocol import ChatCompletion, ChatTokenLogprob, Usage, unix_now
from edge.responses_protocol import (
    INPUT_ITEM,
    ArgumentsDeltaEvent,
    ArgumentsDoneEvent,
    ContentPartEvent,
    DeltaLogprob,
    ErrorEvent,
    FunctionToolCall,
    IncompleteDetails,
    InputItem,
    InputTokensDetails,
    ItemStatus,
    OutputItem,
    OutputItemEvent,
    OutputMessage,
    OutputText,
    ResponseError,
    ResponseEvent,
    ResponseObject,
    ResponsesRequest,
    ResponseStatus,
    ResponseUsage,
    StreamEvent,
    TextDeltaEvent,
    TextDoneEvent,
)
from edge.tool_calls import ParsedToolCall

# Stored responses kept per edge; the least recently used goes first.
STORE_SIZE = 1000


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass
class Turn:
    """One Responses request being answered: the request, the conversation it continues,
    and the ids its output gets."""

    body: ResponsesRequest
    history: Sequence[InputItem] = ()
    id: str = field(default_factory=lambda: _id("resp"))
    created_at: int = field(default_factory=unix_now)
    message_id: str = field(default_factory=lambda: _id("msg"))

    def response(
        self, status: ResponseStatus, output: Sequence[OutputItem] = (), **fields: Any
    ) -> ResponseObject:
        """The ``response`` object in ``status``, echoing the request."""
        body = self.body
        return ResponseObject(
            id=self.id,
            created_at=self.created_at,
            status=status,
            instructions=body.instructions,
            max_output_tokens=body.max_output_tokens,
            metadata=body.metadata or {},
            model=body.model,
            output=list(output),
            parallel_tool_calls=bool(body.parallel_tool_calls),
            previous_response_id=body.previous_response_id,
            store=body.store,
            temperature=body.temperature,
            text=body.text,
            tool_choice=body.tool_choice,
            tools=body.tools or [],
            top_logprobs=body.top_logprobs,
            top_p=body.top_p,
            user=body.user,
            **fields,
        )

    def message(
        self, text: str, status: ItemStatus, logprobs: Sequence[ChatTokenLogprob] = ()
    ) -> OutputMessage:
        """The assistant message item (``status`` in_progress: no content part yet)."""
        content = [] if status == "in_progress" else [OutputText(text=text, logprobs=[*logprobs])]
        return OutputMessage(id=self.message_id, status=status, content=content)

    def finished(
        self,
        content: str | None,
        calls: Sequence[ParsedToolCall],
        finish_reason: str,
        usage: Usage,
        logprobs: Sequence[ChatTokenLogprob] = (),
    ) -> ResponseObject:
        """The final response: a message unless the answer is calls only, then the calls."""
        status: Literal["completed", "incomplete"] = (
            "incomplete" if finish_reason == "length" else "completed"
        )
        output: list[OutputItem] = []
        if content or not calls:
            output.append(self.message(content or "", status, logprobs))
        output += [_function_call(c) for c in calls]
        return self.response(
            status,
            output=output,
            usage=_usage(usage),
            incomplete_details=IncompleteDetails(reason="max_output_tokens")
            if status == "incomplete"
            else None,
        )


def _function_call(call: ParsedToolCall) -> FunctionToolCall:
    return FunctionToolCall(
        id=f"fc_{call.id.removeprefix('call_')}",
        call_id=call.id,
        name=call.name,
        arguments=call.arguments,
        status="completed",
    )


def _usage(usage: Usage) -> ResponseUsage:
    return ResponseUsage(
        input_tokens=usage.prompt_tokens,
        input_tokens_details=InputTokensDetails(
            cached_tokens=usage.prompt_tokens_details.cached_tokens
        ),
        output_tokens=usage.completion_tokens,
        total_tokens=usage.total_tokens,
        tandem=usage.tandem,
    )


def from_chat(turn: Turn, answer: ChatCompletion) -> ResponseObject:
    """The ``response`` of a whole chat answer."""
    choice = answer.choices[0]
    message = choice.message
    calls = [
        ParsedToolCall(c.id, c.function.name, c.function.arguments)
        for c in message.tool_calls or []
    ]
    spelled = _Spelling()
    spelled.push((choice.logprobs.content or []) if choice.logprobs else [])
    logprobs = spelled.shown(message.content or "")
    finish_reason = choice.finish_reason or "stop"
    return turn.finished(message.content, calls, finish_reason, answer.usage, logprobs)


class _Spelling:
    """Matches logprob entries to the text shown, by bytes: an entry goes with the text
    that completes it; entries of text never shown (tool-call markup) are left over.
    So an output text's logprobs always spell (a prefix of) its text."""

    def __init__(self) -> None:
        self._pending: deque[ChatTokenLogprob] = deque()
        self._room = 0  # bytes shown that no entry covers yet

    def push(self, entries: Iterable[ChatTokenLogprob]) -> None:
        """Entries of generated tokens, in order."""
        self._pending.extend(entries)

    def shown(self, text: str) -> list[ChatTokenLogprob]:
        """The entries ``text`` (shown after all before it) completes."""
        self._room += len(text.encode())
        out = []
        while self._pending and len(self._pending[0].bytes or ()) <= self._room:
            entry = self._pending.popleft()
            self._room -= len(entry.bytes or ())
            out.append(entry)
        return out


# -- the store ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredResponse:
    """A stored response and the whole conversation up to and including its output."""

    response: ResponseObject
    conversation: tuple[InputItem, ...]


class ResponseStore:
    """Stored responses of this edge, least recently used evicted past ``capacity``.

    Used from the event loop only. Conversations share their item objects, so a
    long chain costs one tuple of references per stored response."""

    def __init__(self, capacity: int = STORE_SIZE) -> None:
        self.capacity = capacity
        self._stored: OrderedDict[str, StoredResponse] = OrderedDict()

    def get(self, response_id: str, param: str | None = None) -> StoredResponse:
        """The stored response; ResponseNotFoundError (404) if unknown, evicted or unstored."""
        stored = self._stored.get(response_id)
        if stored is None:
            raise ResponseNotFoundError(
                f"no stored response with id {response_id!r} (unknown, not stored, or "
                f"evicted: this edge keeps the last {self.capacity})",
                param=param,
            )
        self._stored.move_to_end(response_id)
        return stored

    def history(self, previous_response_id: str | None) -> tuple[InputItem, ...]:
        """The conversation a request continues (empty without ``previous_response_id``)."""
        if previous_response_id is None:
            return ()
        return self.get(previous_response_id, param="previous_response_id").conversation

    def remember(self, turn: Turn, response: ResponseObject) -> ResponseObject:
        """Store a finished response if its request asked to (``store``, default true)."""
        if turn.body.store:
            output = [INPUT_ITEM.validate_python(item.model_dump()) for item in response.output]
            conversation = (*turn.history, *turn.body.input, *output)
            self._stored[response.id] = StoredResponse(response, conversation)
            while len(self._stored) > self.capacity:
                self._stored.popitem(last=False)
        return response

    def delete(self, response_id: str) -> None:
        """Forget a stored response (404 if unknown)."""
        self.get(response_id)
        del self._stored[response_id]


# -- streaming ---------------------------------------------------------------------------


class _Events:
    """Numbers and encodes one stream's events."""

    def __init__(self) -> None:
        self._seq = itertools.count()

    def __call__(self, kind: type[StreamEvent], **fields: Any) -> bytes:
        event = kind(sequence_number=next(self._seq), **fields)
        data = event.model_dump_json(by_alias=True)
        return f"event: {event.type}\ndata: {data}\n\n".encode()


async def stream_response(
    events: Events, ctx: AnswerContext, turn: Turn, store: ResponseStore
) -> AsyncIterator[bytes]:
    """The Responses event stream of a chat answer; the final response is stored."""
    emit = _Events()
    for kind in ("response.created", "response.in_progress"):
        yield emit(ResponseEvent, type=kind, response=turn.response("in_progress"))
    message = _StreamedMessage(emit, turn)
    try:
        async with aclosing(chat_pieces(events, ctx)) as pieces:
            async for piece in pieces:
                if isinstance(piece, AnswerText):
                    for chunk in message.add(piece):
                        yield chunk
                    continue
                final = turn.finished(message.content, piece.calls, piece.finish_reason,
                                      ctx.usage(piece.stats), message.logprobs)  # fmt: skip
                for chunk in _close_items(emit, turn, final, opened=message.opened):
                    yield chunk
                store.remember(turn, final)
                yield emit(ResponseEvent, type=f"response.{final.status}", response=final)
    except EdgeError as exc:
        # Headers are gone already: the failure travels as events, as OpenAI sends it.
        ctx.on_error(exc)
        yield emit(ErrorEvent, code=exc.code or exc.type, message=exc.message, param=exc.param)
        error = ResponseError(code="server_error", message=exc.message)
        yield emit(ResponseEvent, type="response.failed",
                   response=turn.response("failed", error=error))  # fmt: skip


class _StreamedMessage:
    """The message of a streamed response: its text deltas as they come, with the
    logprobs that spell them."""

    def __init__(self, emit: _Events, turn: Turn) -> None:
        self._emit = emit
        self._turn = turn
        self._parts: list[str] = []
        self._spelling = _Spelling()
        self.logprobs: list[ChatTokenLogprob] = []

    @property
    def opened(self) -> bool:
        """Whether the message item is out (its first text was)."""
        return bool(self._parts)

    @property
    def content(self) -> str:
        """The text so far."""
        return "".join(self._parts)

    def add(self, piece: AnswerText) -> list[bytes]:
        """The events of a text piece: none while its text is held back or not whole yet."""
        self._spelling.push(piece.logprobs)
        if not piece.text:
            return []
        out = [] if self.opened else _open_message(self._emit, self._turn)
        self._parts.append(piece.text)
        shown = self._spelling.shown(piece.text)
        self.logprobs += shown
        out.append(
            self._emit(TextDeltaEvent, item_id=self._turn.message_id, output_index=0,
                       delta=piece.text, logprobs=[DeltaLogprob.of(e) for e in shown])
        )  # fmt: skip
        return out


def _open_message(emit: _Events, turn: Turn) -> list[bytes]:
    return [
        emit(OutputItemEvent, type="response.output_item.added", output_index=0,
             item=turn.message("", "in_progress")),
        emit(ContentPartEvent, type="response.content_part.added", item_id=turn.message_id,
             output_index=0, part=OutputText(text="")),
    ]  # fmt: skip


def _close_items(emit: _Events, turn: Turn, final: ResponseObject, *, opened: bool) -> list[bytes]:
    """The events that finish the message (opening it first if the answer had no text
    and no calls) and deliver each call, in the final response's output order."""
    out: list[bytes] = []
    for index, item in enumerate(final.output):
        if isinstance(item, OutputMessage):
            if not opened:
                out += _open_message(emit, turn)
            part = item.content[0]
            logprobs = [DeltaLogprob.of(e) for e in part.logprobs]
            out += [
                emit(TextDoneEvent, item_id=item.id, output_index=index, text=part.text,
                     logprobs=logprobs),
                emit(ContentPartEvent, type="response.content_part.done", item_id=item.id,
                     output_index=index, part=part),
            ]  # fmt: skip
        else:
            pending = item.model_copy(update={"arguments": "", "status": "in_progress"})
            out += [
                emit(OutputItemEvent, type="response.output_item.added", output_index=index,
                     item=pending),
                emit(ArgumentsDeltaEvent, item_id=item.id, output_index=index,
                     delta=item.arguments),
                emit(ArgumentsDoneEvent, item_id=item.id, output_index=index, name=item.name,
                     arguments=item.arguments),
            ]  # fmt: skip
        out.append(
            emit(OutputItemEvent, type="response.output_item.done", output_index=index, item=item)
        )
    return out
