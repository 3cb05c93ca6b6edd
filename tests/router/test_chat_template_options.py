"""vLLM's chat rendering fields on /v1/chat/completions and /tokenize, through the official
``openai`` client: ``add_generation_prompt``, ``continue_final_message`` (an assistant
prefill) and ``chat_template_kwargs`` (Qwen3's ``enable_thinking``, which the template
``make-model`` writes honours). Before, each was a 400 "unknown field"."""

from __future__ import annotations

import httpx
import openai
import pytest

CHAT = [{"role": "user", "content": "Say hi"}]
PREFILL = [*CHAT, {"role": "assistant", "content": "The answer is"}]


@pytest.fixture(scope="module")
def oai(stack):
    with openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0,
                       timeout=10) as client:
        yield client


def _prompt_text(stack, tokenizer, oai, request_id: str, messages, **extra) -> str:
    oai.chat.completions.create(model="fake-model", messages=messages, max_tokens=2,
                                extra_body={"request_id": request_id, **extra})
    ids = stack.backend.last_request(request_id).prompt_token_ids
    return tokenizer.decode(ids, skip_special_tokens=False)


def test_enable_thinking_reaches_the_template(stack, tokenizer, oai):
    plain = _prompt_text(stack, tokenizer, oai, "think-default", CHAT)
    assert plain.endswith("<|im_start|>assistant\n")
    off = _prompt_text(stack, tokenizer, oai, "think-off", CHAT,
                       chat_template_kwargs={"enable_thinking": False})
    assert off == plain + "<think>\n\n</think>\n\n"
    on = _prompt_text(stack, tokenizer, oai, "think-on", CHAT,
                      chat_template_kwargs={"enable_thinking": True})
    assert on == plain


def test_add_generation_prompt_false_leaves_the_assistant_turn_unopened(stack, tokenizer, oai):
    text = _prompt_text(stack, tokenizer, oai, "no-gen", CHAT, add_generation_prompt=False)
    assert text.endswith("Say hi<|im_end|>\n") and "assistant" not in text


def test_continue_final_message_prefills_the_assistants_reply(stack, tokenizer, oai):
    text = _prompt_text(stack, tokenizer, oai, "prefill", PREFILL,
                        add_generation_prompt=False, continue_final_message=True)
    assert text.endswith("<|im_start|>assistant\nThe answer is")
    # without it the assistant's message is a closed turn and a new one opens
    closed = _prompt_text(stack, tokenizer, oai, "closed", PREFILL)
    assert closed.endswith("The answer is<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize(("extra", "param"), [
    ({"continue_final_message": True}, "continue_final_message"),  # with a generation prompt
    ({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"chat_template": "{{ 'x' }}"}}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"bos_token": "x"}}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"not a name": 1}}, "chat_template_kwargs"),
    ({"chat_template_kwargs": ["enable_thinking"]}, "chat_template_kwargs"),
    ({"add_generation_prompt": "yes"}, "add_generation_prompt"),
])
def test_bad_rendering_fields_are_400s_naming_them(oai, extra, param):
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model="fake-model", messages=PREFILL, max_tokens=2,
                                    extra_body=extra)
    assert err.value.body["param"] == param, err.value.body


def test_tokenize_renders_as_the_chat_route_does(stack, tokenizer, oai):
    fields = {"add_generation_prompt": False, "continue_final_message": True,
              "chat_template_kwargs": {"enable_thinking": False}}
    _prompt_text(stack, tokenizer, oai, "tok-same", PREFILL, **fields)
    sent = stack.backend.last_request("tok-same").prompt_token_ids
    resp = httpx.post(f"{stack.base_url}/tokenize", timeout=10,
                      json={"model": "fake-model", "messages": PREFILL, **fields})
    assert resp.status_code == 200, resp.text
    assert resp.json()["tokens"] == sent
    off = httpx.post(f"{stack.base_url}/tokenize", timeout=10, json={
        "messages": CHAT, "chat_template_kwargs": {"enable_thinking": False}}).json()
    assert tokenizer.decode(off["tokens"], skip_special_tokens=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_template_variables_count_toward_the_prompt_limit(stack, oai):
    """A template may print a variable (Llama 3's date_string): a huge one is the prompt's
    size, refused before the render, not rendered and tokenized on the event loop."""
    huge = "x" * (stack.service.config.max_prompt_chars + 1)
    with pytest.raises(openai.BadRequestError, match="more than this server's limit"):
        oai.chat.completions.create(model="fake-model", messages=CHAT, max_tokens=2,
                                    extra_body={"chat_template_kwargs": {"date_string": huge}})
