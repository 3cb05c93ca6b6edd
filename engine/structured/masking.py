"""Batched grammar masking: one int32 bitmask ``[rows, ceil(vocab / 32)]`` per step.

Bit ``v % 32`` of word ``v // 32`` in row i is set when token v is allowed for row i. The
constrained rows are filled by xgrammar's batch matcher (C++, its own threads, no Python per
token), then the bitmask is applied to the logits in place by xgrammar's kernel for the
logits' device (CPU, CUDA/Triton): disallowed tokens get -inf. Unconstrained rows are not
touched.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import xgrammar as xgr

from engine.structured.grammar import GrammarState


class GrammarMasker:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        # Filling a row takes microseconds (xgrammar caches most of each state's mask), so
        # threads pay off only with cores to spare: at most half of them (torch has the
        # rest); with two, waking a worker thread costs more than the fill.
        self._batch = xgr.BatchGrammarMatcher(max_threads=max(1, min(8, _cpus() // 2)))
        self._bitmask: torch.Tensor | None = None  # host, [capacity, words] int32

    def _buffer(self, rows: int, vocab: int) -> torch.Tensor:
        words = (vocab + 31) // 32
        buf = self._bitmask
        if buf is None or buf.shape[0] < rows or buf.shape[1] != words:
            capacity = max(rows, 2 * buf.shape[0] if buf is not None else 16)
            buf = xgr.allocate_token_bitmask(capacity, vocab)
            if self.device.type == "cuda":
                buf = buf.pin_memory()  # the host→device copy below overlaps
            self._bitmask = buf
        return buf

    def apply(self, logits: torch.Tensor, states: Sequence[GrammarState | None]) -> None:
        """Mask ``logits`` ([n, vocab] float32, contiguous) in place: row i by ``states[i]``
        (None: unconstrained)."""
        rows = [i for i, s in enumerate(states) if s is not None]
        if not rows:
            return
        # xgrammar's CPU kernel reads the logits as contiguous rows: on a strided view (the
        # LM head's transposed output) it silently masks the wrong entries.
        assert logits.is_contiguous(), "grammar masks need contiguous logits rows"
        n, vocab = logits.shape
        bitmask = self._buffer(n, vocab)
        matchers = [states[i].matcher for i in rows]  # type: ignore[union-attr]
        self._batch.batch_fill_next_token_bitmask(matchers, bitmask, indices=rows)
        mask = bitmask[:n]
        if logits.device.type != "cpu":
            mask = mask.to(logits.device, non_blocking=True)
        xgr.apply_token_bitmask_inplace(logits, mask, vocab_size=vocab, indices=rows)


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
