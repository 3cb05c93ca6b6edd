"""Batched sampling: penalties, temperature, top-k, top-p, min-p, seeds and logprobs.

One pass over the ``[num_samples, vocab]`` logits of a step; work a feature needs is done
only when some request in the batch uses it. Sampling uses the exponential race
(argmax of p / q with q ~ Exp(1)), equivalent to drawing from p: each seeded request draws
its q from its own generator, so its tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine import fused_ops
from engine.batch import TokenLogprobs
from engine.request import Request


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self._generators: dict[str, torch.Generator] = {}  # seeded requests only
        self._default = torch.Generator(device=device)
        self._default.manual_seed(seed)

    def forget(self, request_id: str) -> None:
        """Drop a finished request's generator."""
        self._generators.pop(request_id, None)

    def __call__(
        self, logits: torch.Tensor, requests: Sequence[Request]
    ) -> tuple[list[int], list[TokenLogprobs | None] | None]:
        """``logits``: [n, vocab] float32 (maybe a transposed view), row i is ``requests[i]``."""
        params = [r.params for r in requests]
        greedy = [p.greedy for p in params]
        if not all(greedy) or any(p.logprobs is not None or p.needs_penalties for p in params):
            # The model may hand over a transposed view (see compute_logits); argmax reads
            # it as is, the rest wants rows contiguous (and the same random draws as ever).
            logits = logits.contiguous()
        raw_logprobs = None
        if any(p.logprobs is not None for p in params):
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        if any(p.needs_penalties for p in params):
            logits = apply_penalties(logits.clone(), requests)
        if all(greedy):
            tokens = fused_ops.argmax_last(logits)
        else:
            tokens = self._sample(logits, requests, greedy)
        token_list = tokens.tolist()
        return token_list, _logprobs(raw_logprobs, token_list, params)

    def _sample(self, logits: torch.Tensor, requests: Sequence[Request], greedy: list[bool]):
        params = [r.params for r in requests]
        temps = torch.tensor(
            [p.temperature if not g else 1.0 for p, g in zip(params, greedy, strict=False)],
            dtype=logits.dtype, device=logits.device,
        )
        scaled = logits / temps.unsqueeze(1)
        scaled = apply_top_k_top_p_min_p(scaled, params)
        probs = torch.softmax(scaled, dim=-1)
        q = torch.empty_like(probs)
        q.exponential_(generator=self._default)
        for i, request in enumerate(requests):
            if request.params.seed is not None and not greedy[i]:
                q[i].exponential_(generator=self._generator_for(request))
        sampled = (probs / q).argmax(dim=-1)
        if any(greedy):
            mask = torch.tensor(greedy, device=logits.device)
            sampled = torch.where(mask, logits.argmax(dim=-1), sampled)
        return sampled

    def _generator_for(self, request: Request) -> torch.Generator:
        gen = self._generators.get(request.request_id)
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(request.params.seed)
            self._generators[request.request_id] = gen
        return gen


def apply_penalties(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
    """Repetition (HF: prompt + output), presence and frequency (OpenAI: output) penalties."""
    vocab = logits.shape[1]
    for i, request in enumerate(requests):
        p = request.params
        if not p.needs_penalties:
            continue
        row = logits[i]
        out_ids = torch.tensor(request.output_token_ids, dtype=torch.long, device=logits.device)
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(request.token_ids, dtype=torch.long, device=logits.device)
            vals = row[seen]
            row[seen] = torch.where(
                vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
            )
        if out_ids.numel() and (p.presence_penalty or p.frequency_penalty):
            counts = torch.zeros(vocab, dtype=row.dtype, device=row.device)
            counts.scatter_add_(0, out_ids, torch.ones_like(out_ids, dtype=row.dtype))
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
    return logits


def apply_top_k_top_p_min_p(logits: torch.Tensor, params: Sequence) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k / nucleus / min-p set."""
    top_k = [p.top_k if p.top_k > 0 else 0 for p in params]
    top_p = [p.top_p for p in params]
    min_p = [p.min_p for p in params]
    vocab = logits.shape[1]
    device = logits.device
    if any(top_k) or any(tp < 1.0 for tp in top_p):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        mask = torch.zeros_like(sorted_logits, dtype=torch.bool)
        if any(top_k):
            k = torch.tensor([k if k else vocab for k in top_k], device=device)
            ranks = torch.arange(vocab, device=device).unsqueeze(0)
            mask |= ranks >= k.unsqueeze(1)
        if any(tp < 1.0 for tp in top_p):
            probs = torch.softmax(sorted_logits.masked_fill(mask, float("-inf")), dim=-1)
            cum_before = probs.cumsum(dim=-1) - probs  # mass strictly above each token
            tp = torch.tensor(top_p, dtype=probs.dtype, device=device).unsqueeze(1)
            mask |= cum_before >= tp  # the most likely token always stays
        sorted_logits = sorted_logits.masked_fill(mask, float("-inf"))
        logits = torch.empty_like(logits).scatter_(1, order, sorted_logits)
    if any(mp > 0.0 for mp in min_p):
        probs = torch.softmax(logits, dim=-1)
        mp = torch.tensor(min_p, dtype=probs.dtype, device=device).unsqueeze(1)
        threshold = probs.max(dim=-1, keepdim=True).values * mp
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def _logprobs(raw: torch.Tensor | None, tokens: list[int], params: Sequence):
    if raw is None:
        return None
    out: list[TokenLogprobs | None] = []
    for i, p in enumerate(params):
        if p.logprobs is None:
            out.append(None)
            continue
        chosen = float(raw[i, tokens[i]])
        top: list[tuple[int, float]] = []
        if p.logprobs > 0:
            vals, ids = raw[i].topk(p.logprobs)
            top = list(zip(ids.tolist(), vals.tolist(), strict=False))
        out.append(TokenLogprobs(chosen, top))
    return out
