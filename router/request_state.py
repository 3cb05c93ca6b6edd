"""Per-request output processing in the router: text deltas, stop strings, usage, latency.

One ``RequestState`` follows one admitted request. ``process(output)`` turns each
``BackendOutput`` into a ``GenerateChunk`` (or None when there is nothing to send yet):

  token ids -> incremental detokenizer -> text delta; a stop string ends the sample at the
  token that completed it ("stop", the stop string as stop_reason; later ids are dropped).

A request of n > 1 samples has one detokenizer per sample (``BackendOutput.index``); the
request is finished when every sample has had its final chunk. A sample ended by a stop
string here is ended on the workers too (``ServingBackend.abort_sample``, called by the
service); outputs of it still in flight are dropped.

It also keeps the latency metrics: TTFT at the first token, ITL between later outputs (the
gap shared by the tokens of a coalesced output), E2E, the running/waiting gauges and the
outcome counter.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from cluster.backend import MIGRATION_COUNT, MIGRATION_TIMING, BackendOutput, TokenLogprob
from router.errors import outcome_code
from router.metrics import ServingMetrics
from router.types import GenerateChunk, LogprobEntry, PreparedRequest, TopToken, Usage

DEADLINE_SLACK_S = 0.05
"""A cancellation this close to the request's deadline is counted as the deadline: the
client's clock and ours read the same deadline a little apart."""


class _Sample:
    """One sample's output state: its detokenizer and counts."""

    def __init__(self, prep: PreparedRequest, tokenizer) -> None:
        want_text = prep.return_text or bool(prep.params.stop)
        # engine.tokenizer.IncrementalDetokenizer: withholds partial characters and possible
        # stop-string starts; the prompt's last tokens give it decoding context.
        self.detok = tokenizer.detokenizer(
            prep.params.stop, prompt_ids=prep.prompt_token_ids,
            skip_special_tokens=prep.skip_special_tokens,
            include_stop=prep.include_stop_str_in_output,
            min_tokens=prep.params.min_tokens) if want_text else None
        self.num_generated = 0
        self.last_token_id: int | None = None
        self.finished = False  # its final chunk has been produced


class RequestState:
    def __init__(self, prep: PreparedRequest, tokenizer, metrics: ServingMetrics,
                 clock: Callable[[], float] = time.time) -> None:
        self.prep = prep
        self._tokenizer = tokenizer
        self._metrics = metrics
        self._clock = clock
        self._samples = [_Sample(prep, tokenizer) for _ in range(prep.n)]
        self.num_cached = 0
        self._prompt_logprobs_sent = False  # a migrated request's re-prefill sends them again
        self._submit_time: float | None = None
        self._first_token_time: float | None = None
        self._last_output_time: float | None = None
        self._counted_running = False

    @property
    def finished(self) -> bool:
        """Every sample's final chunk has been produced."""
        return all(s.finished for s in self._samples)

    @property
    def num_generated(self) -> int:
        return sum(s.num_generated for s in self._samples)

    # ---- lifecycle hooks -------------------------------------------------------------

    def on_submit(self) -> None:
        self._submit_time = self._clock()
        self._metrics.requests_waiting.inc()
        self._metrics.prompt_tokens.inc(len(self.prep.prompt_token_ids))

    def on_end(self, error: BaseException | None) -> None:
        """Record the outcome once, whatever the exit path (success, error, cancel)."""
        if self._submit_time is not None:
            gauge = (self._metrics.requests_running if self._counted_running
                     else self._metrics.requests_waiting)
            gauge.dec()
        code = "OK" if self.finished else outcome_code(error or GeneratorExit())
        if code == "CANCELLED" and self._deadline_passed():
            # gRPC cancels the handler when the call's deadline passes, often just before
            # the router's own deadline fires: that is a deadline, not a client cancel.
            code = "DEADLINE_EXCEEDED"
        self._metrics.requests.labels(code=code).inc()
        if code == "CANCELLED":  # the client went away: an abort, as vLLM counts it (per
            # sample, as the other finish reasons are counted)
            unfinished = sum(not s.finished for s in self._samples)
            self._metrics.finish_reasons.labels(reason="abort").inc(unfinished)

    def _deadline_passed(self) -> bool:
        deadline = self.prep.deadline
        return deadline is not None and self._clock() >= deadline - DEADLINE_SLACK_S

    # ---- outputs ---------------------------------------------------------------------

    def process(self, out: BackendOutput) -> GenerateChunk | None:
        """The chunk to send for one backend output (call only for non-error outputs)."""
        sample = self._samples[out.index]
        if sample.finished:  # ended here by a stop string; the backend is still at it
            return None
        self._observe_latency(len(out.new_token_ids))
        self.num_cached = max(self.num_cached, out.num_cached_tokens)
        ids, text = self._detokenize(sample, out.new_token_ids)
        stopped_by_string = sample.detok is not None and sample.detok.stopped
        finish = "stop" if stopped_by_string else out.finish_reason
        if ids:
            sample.last_token_id = ids[-1]
        sample.num_generated += len(ids)
        self._metrics.generation_tokens.inc(len(ids))
        chunk = GenerateChunk(
            request_id=self.prep.request_id, token_ids=ids,
            text=text if self.prep.return_text else "",
            logprobs=self._logprobs(out.logprobs[: len(ids)]) if out.logprobs else None,
            index=out.index)
        if out.prompt_logprobs and not self._prompt_logprobs_sent:
            self._prompt_logprobs_sent = True
            chunk.prompt_logprobs = self._prompt_logprobs(out.prompt_logprobs)
        if finish is None:
            return chunk if ids or chunk.text else None
        return self._finish(sample, chunk, finish, out.timing, stopped_by_string)

    def _finish(self, sample: _Sample, chunk: GenerateChunk, finish: str,
                backend_timing: dict[str, float], stopped_by_string: bool) -> GenerateChunk:
        if stopped_by_string:
            chunk.stop_reason = sample.detok.matched_stop
        else:
            if sample.detok is not None and self.prep.return_text:
                chunk.text += sample.detok.finish()
            # as vLLM: the stop token's id, but none for the tokenizer's own eos (a
            # generation_config.json eos, such as <|eot_id|>, counts as a stop token there)
            last = sample.last_token_id
            if finish == "stop" and last is not None and (
                    last != self._tokenizer.eos_token_id or self.prep.params.ignore_eos):
                chunk.stop_reason = last
        chunk.finish_reason = finish
        chunk.usage = Usage(len(self.prep.prompt_token_ids), sample.num_generated,
                            self.num_cached)
        chunk.timing = self._timing(backend_timing)
        sample.finished = True
        self._metrics.finish_reasons.labels(reason=finish).inc()
        if not self.finished:  # the request's latency is observed once, at its last sample
            return chunk
        self._metrics.e2e_request_latency.observe(chunk.timing["e2e"])
        for phase, seconds in chunk.timing.items():
            if phase != MIGRATION_COUNT:  # a count, not seconds
                self._metrics.request_phase.labels(phase=phase).observe(seconds)
        if "kv_transfer" in chunk.timing:
            self._metrics.kv_transfer_seconds.labels(
                backend=self._metrics.transfer_backend).observe(chunk.timing["kv_transfer"])
        return chunk

    def _detokenize(self, sample: _Sample, ids: list[int]) -> tuple[list[int], str]:
        """(ids to send, text delta). With stop strings, tokens go in one by one so the ids
        can be cut right after the token that completed a stop string."""
        detok = sample.detok
        if detok is None or not ids:
            return ids, ""
        if not self.prep.params.stop:
            return ids, detok.append(ids)
        parts = []
        for i, token_id in enumerate(ids):
            parts.append(detok.append([token_id]))
            if detok.stopped:
                return ids[: i + 1], "".join(parts)
        return ids, "".join(parts)

    def _logprobs(self, entries: list[TokenLogprob]) -> list[LogprobEntry]:
        return [LogprobEntry(e.token_id, e.logprob, self.token_text(e.token_id),
                             [TopToken(t, lp, self.token_text(t)) for t, lp in e.top])
                for e in entries]

    def _prompt_logprobs(self, entries: list) -> list[LogprobEntry]:
        """The backend's per-prompt-token logprobs (engine TokenLogprobs, None first) with the
        prompt's token ids and texts."""
        prompt = self.prep.prompt_token_ids
        out = [LogprobEntry(prompt[0], None, self.token_text(prompt[0]))]
        for token_id, e in zip(prompt[1:], entries[1:], strict=True):
            out.append(LogprobEntry(token_id, e.logprob, self.token_text(token_id),
                                    [TopToken(t, lp, self.token_text(t)) for t, lp in e.top],
                                    e.rank))
        return out

    def token_text(self, token_id: int) -> str:
        return self._tokenizer.decode([token_id], skip_special_tokens=False)

    # ---- latency ---------------------------------------------------------------------

    def _observe_latency(self, num_new: int) -> None:
        if num_new == 0:
            return
        now = self._clock()
        if self._first_token_time is None:
            self._first_token_time = now
            self._metrics.time_to_first_token.observe(now - self.prep.arrival_time)
            self._metrics.requests_waiting.dec()
            self._metrics.requests_running.inc()
            self._counted_running = True
        elif self._last_output_time is not None:
            gap = (now - self._last_output_time) / num_new
            for _ in range(num_new):
                self._metrics.inter_token_latency.observe(gap)
        self._last_output_time = now

    def _timing(self, backend_timing: dict[str, float]) -> dict[str, float]:
        now = self._clock()
        arrival = self.prep.arrival_time
        submitted = self._submit_time if self._submit_time is not None else now
        timing = {"router_queue": submitted - arrival, "prefill_queue": 0.0,
                  "prefill_compute": 0.0, "kv_transfer": 0.0, "decode_queue": 0.0,
                  "decode": 0.0}
        timing.update({k: float(v) for k, v in backend_timing.items()
                       if k in timing or k in MIGRATION_TIMING})
        first = self._first_token_time if self._first_token_time is not None else now
        timing["ttft"] = first - arrival
        timing["e2e"] = now - arrival
        return timing
