import json
from typing import Any

import pytest

from models import TemplateNotFoundError, TemplateRenderError, load_template, render_chat
from tests.models.support import CONVERSATIONS, TIME_TOOL, WEATHER_TOOL, weather_call

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def test_plain_chat_uses_smollm2_default_system_prompt(template: str) -> None:
    text = render_chat(template, [{"role": "user", "content": "Hi"}])
    assert text == (
        f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_generation_prompt_is_optional(template: str) -> None:
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]
    text = render_chat(template, messages, add_generation_prompt=False)
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"


def test_tools_are_listed_in_the_system_turn(template: str) -> None:
    text = render_chat(template, [{"role": "user", "content": "Hi"}], tools=[WEATHER_TOOL])
    system = text.split("<|im_end|>")[0]
    assert system.startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM}\n\n# Tools")
    listed = system.split("<tools>\n")[1].split("\n</tools>")[0]
    assert json.loads(listed) == WEATHER_TOOL
    assert "Zürich" in listed  # non-ASCII kept, as transformers' tojson does
    instruction = '{"name": <function-name>, "arguments": <args-json-object>}'
    assert f"<tool_call>\n{instruction}\n</tool_call>" in system


def test_tool_signature_ignores_null_fields(template: str) -> None:
    # vLLM passes tools through model_dump(), which adds null fields.
    noisy = {
        "type": "function",
        "function": {
            **TIME_TOOL["function"],
            "description": None,
            "parameters": None,
            "strict": None,
        },
    }
    messages = [{"role": "user", "content": "Time?"}]
    text = render_chat(template, messages, tools=[noisy])
    assert text == render_chat(template, messages, tools=[TIME_TOOL])
    assert '\n{"type": "function", "function": {"name": "now"}}\n' in text


def test_assistant_tool_calls_and_tool_responses(template: str) -> None:
    _, messages, tools, _ = CONVERSATIONS[3]
    text = render_chat(template, messages, tools=tools)
    assert (
        "<|im_start|>assistant\nLet me check.\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n'
        "</tool_call>\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "c"}}\n'
        "</tool_call><|im_end|>\n"
    ) in text
    # Consecutive tool results share one user turn.
    assert (
        '<|im_start|>user\n<tool_response>\n{"temp": 21}\n</tool_response>\n'
        '<tool_response>\n{"temp": 4}\n</tool_response><|im_end|>\n'
    ) in text
    assert text.endswith("<|im_start|>user\nThanks<|im_end|>\n<|im_start|>assistant\n")


def test_openai_string_arguments_render_like_objects(template: str) -> None:
    as_object = [{"role": "assistant", "content": None, "tool_calls": [weather_call("Rome")]}]
    call = weather_call("Rome")
    call["function"] = {**call["function"], "arguments": '{"city":"Rome","unit":"c"}'}
    as_string = [{"role": "assistant", "content": None, "tool_calls": [call]}]
    assert render_chat(template, as_string) == render_chat(template, as_object)
    assert '"arguments": {"city": "Rome", "unit": "c"}}' in render_chat(template, as_string)


@pytest.mark.parametrize("arguments", [None, "", "{not json", "[1, 2]", "42"])
def test_unusable_arguments_render_as_an_empty_object_like_vllm(
    template: str, arguments: str | None
) -> None:
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}
    text = render_chat(template, [{"role": "assistant", "content": "", "tool_calls": [call]}])
    assert '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>' in text


def test_empty_tool_calls_render_a_plain_assistant_turn(template: str) -> None:
    message = {"role": "assistant", "content": "Hello", "tool_calls": []}
    text = render_chat(template, [message], add_generation_prompt=False)
    assert text.endswith("<|im_start|>assistant\nHello<|im_end|>\n")


def test_text_parts_are_joined_like_vllm(template: str) -> None:
    parts = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    text = render_chat(template, [{"role": "user", "content": parts}])
    assert "<|im_start|>user\none\ntwo<|im_end|>" in text


def test_image_parts_are_rejected(template: str) -> None:
    parts = [{"type": "image_url", "image_url": {"url": "x"}}]
    with pytest.raises(TemplateRenderError) as caught:
        render_chat(template, [{"role": "user", "content": parts}])
    assert "image_url" in str(caught.value)


def test_raise_exception_becomes_a_render_error() -> None:
    template = "{{ raise_exception('only user messages, please') }}"
    with pytest.raises(TemplateRenderError) as caught:
        render_chat(template, [])
    assert "only user messages, please" in str(caught.value)


def test_unknown_template_lists_the_known_ones() -> None:
    with pytest.raises(TemplateNotFoundError) as caught:
        load_template("llama-9")
    assert "chatml_tools" in str(caught.value)
    assert load_template("chatml_tools.jinja") == load_template("chatml_tools")


@pytest.mark.parametrize(
    ("messages", "tools", "add_generation_prompt"),
    [case[1:] for case in CONVERSATIONS],
    ids=[c[0] for c in CONVERSATIONS],
)
def test_same_text_as_transformers(
    template: str,
    hf_tokenizer: Any,
    messages: list,
    tools: list | None,
    add_generation_prompt: bool,
) -> None:
    ours = render_chat(template, messages, tools=tools, add_generation_prompt=add_generation_prompt)
    theirs = hf_tokenizer.apply_chat_template(
        messages,
        tools=tools,
        chat_template=template,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )
    assert ours == theirs


@pytest.mark.parametrize(
    ("messages", "tools", "add_generation_prompt"),
    [case[1:] for case in CONVERSATIONS],
    ids=[c[0] for c in CONVERSATIONS],
)
def test_llama_cpp_and_transformers_give_the_same_token_ids(
    template: str,
    hf_tokenizer: Any,
    llama_vocab: Any,
    messages: list,
    tools: list | None,
    add_generation_prompt: bool,
) -> None:
    text = render_chat(template, messages, tools=tools, add_generation_prompt=add_generation_prompt)
    draft = llama_vocab.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    target = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert draft == target
    # Control tokens are single ids on both sides, not spelled out in pieces.
    im_start = hf_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert draft.count(im_start) == text.count("<|im_start|>")
