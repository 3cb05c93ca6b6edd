"""vLLM's ``return_token_ids`` (what RL and evaluation harnesses read instead of
re-tokenizing text): the prompt's token ids and each choice's generated ids, streamed or
not, equal to what the backend was sent and produced. Before, a 400 "unknown field"."""

from __future__ import annotations

import json

import httpx
import pytest


def _post(stack, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{stack.base_url}{path}", json=body, timeout=10)


def _streamed(stack, path: str, body: dict) -> list[dict]:
    events = []
    with httpx.stream("POST", f"{stack.base_url}{path}", json={**body, "stream": True},
                      timeout=10) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
    return events


@pytest.mark.parametrize("prompts", [["Hello there"], ["Hello there", "Bye now"]])
def test_completions_return_the_prompts_and_each_choices_token_ids(stack, tokenizer, prompts):
    rid = f"ids-{len(prompts)}"
    body = {"model": "fake-model", "prompt": prompts, "max_tokens": 6,
            "return_token_ids": True, "request_id": rid}
    resp = _post(stack, "/v1/completions", body)
    assert resp.status_code == 200, resp.text
    whole = resp.json()
    for i, (prompt, choice) in enumerate(zip(prompts, whole["choices"], strict=True)):
        sent = stack.backend.last_request(rid if len(prompts) == 1 else f"{rid}-{i}")
        assert choice["prompt_token_ids"] == sent.prompt_token_ids == tokenizer.encode(prompt)
        assert choice["token_ids"] and tokenizer.decode(choice["token_ids"]) == choice["text"]
    events = _streamed(stack, "/v1/completions", {**body, "request_id": f"{rid}-s"})
    for choice in whole["choices"]:
        parts = [c for e in events for c in e["choices"] if c["index"] == choice["index"]]
        assert parts[0]["prompt_token_ids"] == choice["prompt_token_ids"]
        assert all("prompt_token_ids" not in c for c in parts[1:])  # once, with the first
        assert [t for c in parts for t in c["token_ids"]] == choice["token_ids"]


def test_chat_returns_them_beside_and_in_the_choices(stack, tokenizer):
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 5, "return_token_ids": True, "request_id": "chat-ids"}
    whole = _post(stack, "/v1/chat/completions", body).json()
    sent = stack.backend.last_request("chat-ids").prompt_token_ids
    assert whole["prompt_token_ids"] == sent
    choice = whole["choices"][0]
    assert tokenizer.decode(choice["token_ids"]) == choice["message"]["content"]
    events = _streamed(stack, "/v1/chat/completions", {**body, "request_id": "chat-ids-s"})
    assert events[0]["prompt_token_ids"] == sent
    assert [t for e in events for c in e["choices"] for t in c["token_ids"]] == \
        choice["token_ids"]


def test_without_it_no_ids_are_sent(stack):
    whole = _post(stack, "/v1/completions", {"model": "fake-model", "prompt": "Hi",
                                             "max_tokens": 3}).json()
    assert "token_ids" not in whole["choices"][0]
    assert "prompt_token_ids" not in whole["choices"][0]
