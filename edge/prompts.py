"""From an OpenAI request to prompt token ids, with the context-window checks."""

from __future__ import annotations

from collections.abc import Callable

from edge.errors import ContextLengthError, InvalidRequestError
from edge.openai_protocol import ChatCompletionRequest, CompletionRequest
from mesh.protocol import RenderedPrompt
from models.chat_template import render_chat
from models.errors import ModelError


class PromptBuilder:
    """Renders chats with the catalog's tool-aware template and tokenizes them."""

    def __init__(
        self, template: str, tokenize: Callable[[str], list[int]], n_ctx: int, n_vocab: int
    ) -> None:
        self._template = template
        self._tokenize = tokenize
        self._n_ctx = n_ctx
        self._n_vocab = n_vocab

    def render(self, request: ChatCompletionRequest) -> str:
        """The prompt text of a chat request, ending with the assistant header."""
        try:
            messages = [m.to_template_dict() for m in request.messages]
        except ValueError as exc:
            raise InvalidRequestError(str(exc), param="messages") from exc
        try:
            return render_chat(self._template, messages, tools=request.active_tools())
        except ModelError as exc:
            raise InvalidRequestError(str(exc), param="messages") from exc

    def chat_tokens(self, request: ChatCompletionRequest) -> list[int]:
        """Prompt token ids of a chat request."""
        return self._tokenize(self.render(request))

    def chat_prompt(self, request: ChatCompletionRequest) -> RenderedPrompt:
        """A chat request's prompt ids with the digest of the text they came from, which
        a cloud worker checks before reusing them (``cloud.prompt_reuse``)."""
        text = self.render(request)
        return RenderedPrompt.of(text, self._tokenize(text))

    def completion_tokens(self, request: CompletionRequest) -> list[int]:
        """Prompt token ids of a text completion request."""
        if isinstance(request.prompt, list):
            bad = [t for t in request.prompt if not 0 <= t < self._n_vocab]
            if bad:
                raise InvalidRequestError(
                    f"prompt token id {bad[0]} is outside the vocabulary (0..{self._n_vocab - 1})",
                    param="prompt",
                )
            return list(request.prompt)
        return self._tokenize(request.prompt)

    def completion_budget(self, prompt_len: int, requested: int | None) -> int:
        """max_tokens to use; a clear 400 when the prompt or request cannot fit."""
        room = self._n_ctx - prompt_len
        if room <= 0:
            raise ContextLengthError(
                f"This model's maximum context length is {self._n_ctx} tokens, but the "
                f"messages take {prompt_len} tokens. Shorten the conversation.",
                param="messages",
            )
        if requested is not None and requested > room:
            raise ContextLengthError(
                f"This model's maximum context length is {self._n_ctx} tokens. However, you "
                f"requested {prompt_len + requested} tokens ({prompt_len} in the messages, "
                f"{requested} in the completion). Reduce max_tokens to at most {room}.",
                param="max_tokens",
            )
        return requested or room
