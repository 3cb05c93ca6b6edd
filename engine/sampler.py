"""Batched sampling: logit bias, min_tokens, grammar masks, penalties, temperature, top-k,
top-p, min-p, seeds and logprobs.

One pass over the ``[num_samples, vocab]`` logits of a step; work a feature needs is done
only when some request in the batch uses it. Sampling uses the exponential race
(argmax of p / q with q ~ Exp(1)), equivalent to drawing from p.

Seeded requests: a request's random stream is a function of (seed, output position) only.
Its q for the token at output index k (0 for the first generated token) comes from a
counter-based hash of (seed, k, token id): a 64-bit row key from splitmix64 of (seed, k),
then a 32-bit integer hash per token id, for all seeded rows at once as int32 tensor ops
(32-bit: CPUs multiply int32 vectors ~100x faster than int64 ones, which AVX2 lacks;
23 uniform bits per token are all the sampler uses). Nothing is kept per request, so the
same tokens come out whatever else is in the batch, and also when the request is sampled
on another engine: the first token on a prefill worker and the rest on a decode worker,
after preemption (recompute), and after a resume (prompt + tokens already generated
re-prefilled: the output index continues from there). Unseeded rows draw from the
engine's generator.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine import fused_ops
from engine.batch import TokenLogprobs
from engine.request import Request

# Hash constants. Python ints for the per-row splitmix64; signed int32 for the tensors (int32
# add and multiply wrap like uint32; logical shifts are arithmetic shifts masked).
_M64 = (1 << 64) - 1
_M32 = (1 << 32) - 1


def _i32(x: int) -> int:
    x &= _M32
    return x - (1 << 32) if x >= 1 << 31 else x


_GAMMA64 = 0x9E3779B97F4A7C15
_GAMMA32 = _i32(0x9E3779B9)
_LOWBIAS = (_i32(0x7FEB352D), _i32(0x846CA68B))  # Wellons' lowbias32 multipliers
_UNIFORM_BITS = 23  # u = (top 23 bits + 0.5) / 2**23: exact in float32, strictly in (0, 1)


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self._default = torch.Generator(device=device)  # unseeded requests
        self._default.manual_seed(seed)
        self._columns: torch.Tensor | None = None  # v * GAMMA32 for v < vocab, [1, V] int32
        self._masker = None  # structured outputs' GrammarMasker, built on first use

    def __call__(
        self, logits: torch.Tensor, requests: Sequence[Request]
    ) -> tuple[list[int], list[TokenLogprobs | None] | None]:
        """``logits``: [n, vocab] float32 (maybe a transposed view), row i is ``requests[i]``."""
        params = [r.params for r in requests]
        greedy = [p.greedy for p in params]
        biased = any(p.logit_bias for p in params) or any(_masks_stops(r) for r in requests)
        constrained = any(r.grammar is not None for r in requests)
        if (not all(greedy) or biased or constrained
                or any(p.logprobs is not None or p.needs_penalties for p in params)):
            # The model may hand over a transposed view (see compute_logits); argmax reads
            # it as is, the rest wants rows contiguous.
            logits = logits.contiguous()
        raw_logprobs = None
        if any(p.logprobs is not None for p in params):
            raw_logprobs = torch.log_softmax(logits, dim=-1)  # before any processing (vLLM)
        if biased:
            logits = apply_logit_bias_and_min_tokens(logits.clone(), requests)
        if constrained:  # after the bias (vLLM's order): a bias cannot lift a banned token
            self._grammar_masker().apply(logits, [r.grammar for r in requests])
        if any(p.needs_penalties for p in params):
            logits = apply_penalties(logits.clone(), requests)
        if all(greedy):
            tokens = fused_ops.argmax_last(logits)
        else:
            tokens = self._sample(logits, requests, greedy)
        token_list = tokens.tolist()
        return token_list, _logprobs(raw_logprobs, token_list, params)

    def _grammar_masker(self):
        if self._masker is None:
            from engine.structured.masking import GrammarMasker

            self._masker = GrammarMasker(self.device)
        return self._masker

    def _sample(self, logits: torch.Tensor, requests: Sequence[Request], greedy: list[bool]):
        params = [r.params for r in requests]
        temps = torch.tensor(
            [p.temperature if not g else 1.0 for p, g in zip(params, greedy, strict=False)],
            dtype=logits.dtype, device=logits.device,
        )
        scaled = logits / temps.unsqueeze(1)
        scaled = apply_top_k_top_p_min_p(scaled, params)
        probs = torch.softmax(scaled, dim=-1)
        q = self._exponentials(requests, greedy, probs)
        sampled = (probs / q).argmax(dim=-1)
        if any(greedy):
            mask = torch.tensor(greedy, device=logits.device)
            sampled = torch.where(mask, logits.argmax(dim=-1), sampled)
        return sampled

    def _exponentials(self, requests: Sequence[Request], greedy: list[bool],
                      probs: torch.Tensor) -> torch.Tensor:
        """q ~ Exp(1), [n, vocab]: hashed from (seed, output index) on seeded rows."""
        rows = [i for i, r in enumerate(requests) if r.params.seed is not None and not greedy[i]]
        if len(rows) == len(requests):
            return self._seeded_exponentials(requests, probs.shape[1])
        q = torch.empty_like(probs)
        q.exponential_(generator=self._default)
        if rows:
            chosen = [requests[i] for i in rows]
            index = torch.tensor(rows, device=probs.device)
            q.index_copy_(0, index, self._seeded_exponentials(chosen, probs.shape[1]))
        return q

    def _seeded_exponentials(self, requests: Sequence[Request], vocab: int) -> torch.Tensor:
        # The output index of the token about to be sampled: everything generated so far,
        # resumed tokens included (they are part of output_token_ids).
        seeds = [r.params.seed for r in requests]
        positions = [r.num_output_tokens for r in requests]
        return seeded_exponentials(seeds, positions, self._column_keys(vocab))

    def _column_keys(self, vocab: int) -> torch.Tensor:
        if self._columns is None or self._columns.shape[1] != vocab:
            self._columns = column_keys(vocab, self.device)
        return self._columns


def column_keys(vocab: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[1, vocab] int32 ``v * GAMMA32`` (mod 2**32): the per-token counters of the hash."""
    cols = torch.arange(vocab, dtype=torch.int32, device=device)
    return cols.mul_(_GAMMA32).unsqueeze(0)


def _splitmix64(x: int) -> int:
    z = (x + _GAMMA64) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def row_key(seed: int, position: int) -> tuple[int, int]:
    """The 64-bit key of (seed, output position), as two signed 32-bit halves."""
    key = _splitmix64(_splitmix64(seed) ^ position)
    return _i32(key), _i32(key >> 32)


def _lowbias32_(z: torch.Tensor, tmp: torch.Tensor) -> None:
    """Wellons' lowbias32 integer hash, in place on int32 ``z`` (``tmp``: scratch)."""
    for shift, mult in ((16, _LOWBIAS[0]), (15, _LOWBIAS[1]), (16, None)):
        torch.bitwise_right_shift(z, shift, out=tmp)
        tmp &= (1 << (32 - shift)) - 1  # logical shift
        z ^= tmp
        if mult is not None:
            z *= mult


def seeded_exponentials(seeds: Sequence[int], positions: Sequence[int],
                        columns: torch.Tensor) -> torch.Tensor:
    """Exp(1) noise [rows, vocab] float32, a pure function of (seed, position, token id).

    ``columns``: ``column_keys(vocab)``. With ``(lo, hi) = row_key(seed, position)``, the
    entry for token v hashes ``h = H(H(v * GAMMA32 + lo) ^ hi)`` (H = lowbias32, mod
    2**32), takes its top 23 bits as u in (0, 1) and returns -log(u).
    """
    keys = [row_key(seed, pos) for seed, pos in zip(seeds, positions, strict=True)]
    halves = torch.tensor(keys, dtype=torch.int32).to(columns.device)  # [rows, 2]
    z = columns + halves[:, :1]  # [rows, vocab]
    tmp = torch.empty_like(z)
    _lowbias32_(z, tmp)
    z ^= halves[:, 1:]
    _lowbias32_(z, tmp)
    torch.bitwise_right_shift(z, 32 - _UNIFORM_BITS, out=tmp)
    tmp &= (1 << _UNIFORM_BITS) - 1
    u = tmp.to(torch.float32).add_(0.5).mul_(1.0 / (1 << _UNIFORM_BITS))
    return u.log_().neg_()


def _masks_stops(request: Request) -> bool:
    """Stop/EOS ids are masked while fewer than min_tokens tokens are out."""
    return request.num_output_tokens < request.params.min_tokens and bool(request.stop_ids)


def apply_logit_bias_and_min_tokens(logits: torch.Tensor,
                                    requests: Sequence[Request]) -> torch.Tensor:
    """Add each request's logit bias and mask (-inf) its stop ids before min_tokens: one
    scatter for the batch each, from flat (row, token) index lists."""
    vocab = logits.shape[1]
    rows: list[int] = []
    cols: list[int] = []
    vals: list[float] = []
    mask_rows: list[int] = []
    mask_cols: list[int] = []
    for i, request in enumerate(requests):
        params = request.params
        if params.logit_bias:  # list-level extends: no per-entry Python work
            rows += [i] * len(params.logit_bias)
            cols += params.logit_bias_ids
            vals += params.logit_bias_values
        if _masks_stops(request):
            stops = [t for t in request.stop_ids if t < vocab]  # ids past the vocab never occur
            mask_rows += [i] * len(stops)
            mask_cols += stops
    device = logits.device
    if rows:
        index = (torch.tensor(rows, device=device), torch.tensor(cols, device=device))
        logits.index_put_(index, torch.tensor(vals, dtype=logits.dtype, device=device),
                          accumulate=True)
    if mask_rows:
        index = (torch.tensor(mask_rows, device=device), torch.tensor(mask_cols, device=device))
        logits.index_put_(index, torch.tensor(float("-inf"), dtype=logits.dtype, device=device))
    return logits


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
    vocab = logits.shape[1]
    # 0: keep every token. So is a top_k at or past the vocabulary, whatever its size (a
    # client's 2**63 would overflow the tensor below and fail the whole batch's step).
    top_k = [p.top_k if 0 < p.top_k < vocab else 0 for p in params]
    top_p = [p.top_p for p in params]
    min_p = [p.min_p for p in params]
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
