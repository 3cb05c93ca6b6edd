"""Prompt logprobs through the official ``openai`` client against an in-process server over
a tiny random-weight model on the disaggregated path (local cluster: prefill and decode
workers, loopback KV transfer): ``echo`` with ``logprobs`` on completions, and vLLM's
``prompt_logprobs`` extra, equal transformers' log-softmax on the same weights (to 1e-4)."""

from __future__ import annotations

import openai
import pytest
import torch

from cluster.config import ClusterConfig
from cluster.runtime import Cluster
from tests.router.test_api_e2e import ENGINE, ClusterStack

PROMPT = [11, 250, 37, 99, 4, 180, 66, 66, 301, 12, 7]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from engine.make_model import make_model
    from engine.tokenizer import Tokenizer

    model = make_model(tmp_path_factory.mktemp("m") / "llama", "llama", "tiny", seed=0,
                       progress=False)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    with torch.inference_mode():
        ref = torch.log_softmax(hf(torch.tensor([PROMPT])).logits[0, :-1].float(), dim=-1)
    config = ClusterConfig.model_validate({
        "model": {"path": str(model), "device": "cpu"},
        "prefill": {"engine": ENGINE}, "decode": {"engine": ENGINE},
        "transfer": {"backend": "loopback", "timeout_s": 5}, "scheduler": {"block_size": 4}})
    stack = ClusterStack(Cluster(config, mode="local"), Tokenizer(model))
    with openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="x", max_retries=0,
                       timeout=60) as client:
        yield client, ref, stack.grpc_address
    stack.close()


def _want(ref: torch.Tensor) -> list[float]:
    return ref.gather(1, torch.tensor(PROMPT[1:]).unsqueeze(1)).squeeze(1).tolist()


@pytest.mark.parametrize("stream", [False, True])
def test_echo_with_logprobs_gives_the_prompts_logprobs(setup, stream):
    client, ref, _ = setup
    kwargs = {"model": "tiny", "prompt": PROMPT, "max_tokens": 3, "temperature": 0.0,
              "echo": True, "logprobs": 1}
    if stream:
        first = next(iter(client.completions.create(stream=True, **kwargs)))
        logprobs = first.choices[0].logprobs
    else:
        logprobs = client.completions.create(**kwargs).choices[0].logprobs
    P = len(PROMPT)
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    torch.testing.assert_close(torch.tensor(logprobs.token_logprobs[1:P]),
                               torch.tensor(_want(ref)), atol=1e-4, rtol=0)
    # each prompt token's own logprob with the likeliest one (one entry when they agree)
    assert all(1 <= len(top) <= 2 for top in logprobs.top_logprobs[1:])
    assert all(top[token] == lp for token, lp, top in zip(
        logprobs.tokens[1:], logprobs.token_logprobs[1:], logprobs.top_logprobs[1:], strict=True))
    assert len(logprobs.tokens) == len(logprobs.text_offset) > P  # prompt, then generated
    assert logprobs.text_offset[0] == 0
    if not stream:
        assert len(logprobs.tokens) == P + 3


@pytest.mark.parametrize("stream", [False, True])
def test_vllm_prompt_logprobs_extra_on_every_choice(setup, stream):
    """n = 2: the prompt's logprobs (computed once, with sample 0) on both choices; when
    streaming, in each choice's first event."""
    client, ref, _ = setup
    kwargs = {"model": "tiny", "prompt": PROMPT, "max_tokens": 2, "n": 2, "seed": 3,
              "extra_body": {"prompt_logprobs": 2}}
    if stream:
        firsts: dict[int, dict] = {}
        for event in client.completions.create(stream=True, **kwargs):
            for choice in event.model_dump()["choices"]:
                firsts.setdefault(choice["index"], choice)
        choices = [firsts[0], firsts[1]]
    else:
        choices = client.completions.create(**kwargs).model_dump()["choices"]
    top2 = ref.topk(2, dim=-1)
    for choice in choices:
        assert choice["logprobs"] is None  # logprobs were not asked for
        prompt_logprobs = choice["prompt_logprobs"]
        assert len(prompt_logprobs) == len(PROMPT) and prompt_logprobs[0] is None
        for pos, (entry, want) in enumerate(zip(prompt_logprobs[1:], _want(ref), strict=True)):
            chosen = entry[str(PROMPT[pos + 1])]  # JSON object keys: token ids as strings
            assert chosen["logprob"] == pytest.approx(want, abs=1e-4)
            assert chosen["rank"] == int((ref[pos] > ref[pos, PROMPT[pos + 1]]).sum()) + 1
            ranks = {int(t): v["rank"] for t, v in entry.items()}
            for rank, token in enumerate(top2.indices[pos].tolist(), start=1):
                assert ranks[token] == rank


def test_chat_prompt_logprobs_beside_the_choices(setup):
    client, _, _ = setup
    resp = client.chat.completions.create(model="tiny", max_tokens=2,
                                          messages=[{"role": "user", "content": "Hi."}],
                                          extra_body={"prompt_logprobs": 0})
    body = resp.model_dump()
    prompt_logprobs = body["prompt_logprobs"]
    assert prompt_logprobs[0] is None
    assert len(prompt_logprobs) == body["usage"]["prompt_tokens"]
    assert all(len(entry) == 1 for entry in prompt_logprobs[1:])  # the prompt token only


def test_grpc_prompt_logprobs_on_the_first_message(setup):
    """gRPC: GenerateResponse.prompt_logprobs of the first message, every prompt token after
    the first, with ranks and alternatives, equal to transformers'."""
    from router.client import SplitServeClient

    _, ref, address = setup
    with SplitServeClient(address, timeout=60) as grpc_client:
        chunks = list(grpc_client.stream(PROMPT, max_tokens=2, temperature=0.0,
                                         prompt_logprobs=1))
    entries = chunks[0].prompt_logprobs
    assert [e.token_id for e in entries] == PROMPT[1:]
    torch.testing.assert_close(torch.tensor([e.logprob for e in entries]),
                               torch.tensor(_want(ref)), atol=1e-4, rtol=0)
    assert all(e.rank >= 1 and len(e.top) == 1 for e in entries)
    assert all(c.prompt_logprobs is None for c in chunks[1:])
