"""Text for the engine's outputs: stop strings while running, the final text at the end.

Incremental detokenization costs a decode call per request per step, so it runs only for
requests with stop strings; the others are decoded once when they finish.
"""

from __future__ import annotations

from engine.request import Request, RequestStatus


class TextTracker:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._detoks: dict = {}  # request id -> IncrementalDetokenizer (stop strings only)
        self._fed: dict[str, int] = {}  # request id -> output tokens fed so far

    def add(self, request: Request) -> None:
        if self.tokenizer is None or not request.params.stop:
            return
        from engine.tokenizer import IncrementalDetokenizer

        self._detoks[request.request_id] = IncrementalDetokenizer(
            self.tokenizer, stop=list(request.params.stop),
            min_tokens=request.params.min_tokens)
        self._fed[request.request_id] = 0

    def check_stop_strings(self, request: Request) -> bool:
        """Feed the request's new tokens; True once a stop string has appeared."""
        detok = self._detoks.get(request.request_id)
        if detok is None:
            return False
        fed = self._fed[request.request_id]
        new = request.token_ids[request.num_prompt_tokens + fed :]
        self._fed[request.request_id] = fed + len(new)
        if new and not detok.stopped:
            detok.append(new)
        return detok.stopped

    def finish(self, request: Request) -> tuple[str, str | int | None]:
        """Final text and stop reason (the stop string, or the token id that stopped it)."""
        detok = self._detoks.pop(request.request_id, None)
        self._fed.pop(request.request_id, None)
        if detok is not None and detok.stopped:
            return detok.text, detok.matched_stop
        text = "" if self.tokenizer is None else self.tokenizer.decode(request.output_token_ids)
        reason = None
        if request.status == RequestStatus.FINISHED_STOPPED and request.num_output_tokens:
            reason = request.token_ids[-1]
        return text, reason
