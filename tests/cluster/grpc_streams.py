"""Clients streaming over gRPC on threads, for the Ray cluster fault tests: every chunk and
every end is recorded under one condition, so a test waits for what it needs (no polling)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence


class GrpcStreams:
    """One streaming request per prompt, each on a thread. ``tokens[i]`` grows as tokens
    arrive; ``finish[i]`` is the finish reason; ``error[i]`` the exception the stream ended
    with (None if it did not). Several sets share a condition (``changed=other.changed``)
    so that one waits on them all."""

    def __init__(self, endpoint: str, prompts: Sequence, max_tokens: int,
                 sampling: dict | None = None,
                 changed: threading.Condition | None = None) -> None:
        from router.client import SplitServeClient

        self.sampling = {"temperature": 0.0, **(sampling or {})}
        self.max_tokens = max_tokens
        self.client = SplitServeClient(endpoint, timeout=120)
        self.tokens: list[list[int]] = [[] for _ in prompts]
        self.finish: list[str | None] = [None] * len(prompts)
        self.error: list[BaseException | None] = [None] * len(prompts)
        self.changed = changed or threading.Condition()
        self.threads = [threading.Thread(target=self._run, args=(i, p), daemon=True)
                        for i, p in enumerate(prompts)]
        for t in self.threads:
            t.start()

    @property
    def outcome(self) -> list[str | BaseException | None]:
        """Per stream: its exception if it failed, else its finish reason."""
        return [e if e is not None else f for e, f in zip(self.error, self.finish, strict=True)]

    @property
    def errors(self) -> list[BaseException]:
        return [e for e in self.error if e is not None]

    def _run(self, i: int, prompt) -> None:
        try:
            for chunk in self.client.stream(prompt, max_tokens=self.max_tokens,
                                            ignore_eos=True, **self.sampling):
                with self.changed:
                    self.tokens[i].extend(chunk.token_ids)
                    self.finish[i] = chunk.finish_reason or self.finish[i]
                    self.changed.notify_all()
        except BaseException as exc:  # reported by the test, never swallowed
            with self.changed:
                self.error[i] = exc
                self.changed.notify_all()

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 60.0) -> None:
        """Wait until ``predicate()`` holds (checked at every chunk and end)."""
        with self.changed:
            ok = self.changed.wait_for(predicate, timeout)
        assert ok, f"timed out; tokens so far {self.tokens}"

    def join(self, timeout: float = 120.0, allow_errors: bool = False) -> None:
        """Wait for every stream to end (none may hang); unless ``allow_errors``, none
        may have failed."""
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self.client.close()
        assert not any(t.is_alive() for t in self.threads), "a stream hung"
        assert allow_errors or not self.errors, self.errors
