"""Per-request sampling parameters, validated once at construction (ValueError names the field)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property

from engine.structured.spec import StructuredSpec

LOGIT_BIAS_LIMIT = 100.0  # biases are clamped to [-100, 100] (OpenAI's range)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    """Upper bound on generated tokens (the prompt is not counted)."""
    temperature: float = 1.0
    """0 means greedy (argmax); otherwise logits are divided by it before sampling."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability mass reaches top_p."""
    top_k: int = -1
    """Keep only the k most likely tokens; -1 (or 0) disables."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely token's."""
    seed: int | None = None
    """Per-request seed: its random stream is a function of (seed, output position), so the
    same seed gives the same tokens whatever else is in the batch and wherever the request
    is sampled (split prefill/decode, after preemption or a resume). n > 1 siblings use
    seed + i."""
    stop: tuple[str, ...] = ()
    """Stop strings: generation ends when the text contains one (it is not included)."""
    stop_token_ids: tuple[int, ...] = ()
    """Extra token ids that end generation (the token is included in the output ids)."""
    ignore_eos: bool = False
    """Keep generating past the model's end-of-sequence token (benchmarks)."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token already generated (OpenAI semantics)."""
    frequency_penalty: float = 0.0
    """Subtracted once per occurrence of a token among the generated ones."""
    repetition_penalty: float = 1.0
    """Divides positive / multiplies negative logits of tokens seen in prompt or output (HF)."""
    logprobs: int | None = None
    """Return the chosen token's logprob and the top-n alternatives (0 = chosen token only)."""
    prompt_logprobs: int | None = None
    """vLLM's extra: every prompt token's logprob (the first has none) and the top-n
    alternatives at each position (0 = the prompt token only), from the raw logits. Such a
    request takes no prefix-cache hits: every prompt position is computed."""
    min_tokens: int = 0
    """Do not stop before this many tokens: EOS and stop ids are masked out until then."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """Added to the logits of the given token ids before sampling (greedy included): a
    mapping or pairs {token id: bias}, stored as sorted (id, bias) pairs, each bias clamped to
    [-100, 100]. +100 all but forces a token, -100 all but bans it."""
    structured: StructuredSpec | None = None
    """Constrain the output to a JSON schema / JSON object / regex / choice / grammar
    (``engine.structured``); validated when the spec is built. The grammar decides where the
    output ends, so min_tokens and ignore_eos cannot be combined with it."""

    def __post_init__(self) -> None:
        # Accept any iterable of stops (a list from JSON, a single string) and freeze it.
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids or ()))
        object.__setattr__(self, "logit_bias", _normalise_logit_bias(self.logit_bias))
        self._validate()

    def _validate(self) -> None:
        checks = [
            ("max_tokens", self.max_tokens >= 1, "must be at least 1"),
            ("temperature", 0.0 <= self.temperature <= 100.0, "must be in [0, 100]"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("top_k", self.top_k == -1 or self.top_k >= 0, "must be -1 (disabled) or >= 0"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be in [-2, 2]"),
            ("repetition_penalty", 0.0 < self.repetition_penalty <= 10.0, "must be in (0, 10]"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "must be in [0, 20]"),
            ("prompt_logprobs", self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
             "must be in [0, 20]"),
            ("min_tokens", 0 <= self.min_tokens <= self.max_tokens, "must be in [0, max_tokens]"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
            ("stop_token_ids", all(t >= 0 for t in self.stop_token_ids), "must be >= 0"),
            ("seed", self.seed is None or 0 <= self.seed < 2**63, "must be in [0, 2**63)"),
            ("logit_bias", all(t >= 0 for t, _ in self.logit_bias),
             "token ids must be >= 0"),
            ("structured", self.structured is None
             or isinstance(self.structured, StructuredSpec), "must be a StructuredSpec"),
            ("min_tokens", self.structured is None or self.min_tokens == 0,
             "cannot be combined with structured output (the grammar decides where it ends)"),
            ("ignore_eos", self.structured is None or not self.ignore_eos,
             "cannot be combined with structured output (the grammar decides where it ends)"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{name}={getattr(self, name)!r} {why}")

    @cached_property
    def logit_bias_ids(self) -> tuple[int, ...]:
        return tuple(t for t, _ in self.logit_bias)

    @cached_property
    def logit_bias_values(self) -> tuple[float, ...]:
        return tuple(b for _, b in self.logit_bias)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )


def _normalise_logit_bias(bias) -> tuple[tuple[int, float], ...]:
    """{id: bias} or (id, bias) pairs -> sorted pairs, biases clamped to [-100, 100].
    Ids may be strings of digits (JSON object keys)."""
    if not bias:
        return ()
    pairs = bias.items() if isinstance(bias, Mapping) else bias
    out: dict[int, float] = {}
    try:
        for token, value in pairs:
            token_id, value = int(token), float(value)
            if not math.isfinite(value):
                raise ValueError
            out[token_id] = min(LOGIT_BIAS_LIMIT, max(-LOGIT_BIAS_LIMIT, value))
    except (TypeError, ValueError):
        raise ValueError(
            f"SamplingParams.logit_bias={bias!r} must map token ids (integers) to finite "
            "numbers"
        ) from None
    return tuple(sorted(out.items()))
