"""Forked siblings in the pure scheduler (hand-built runner outputs): random arrivals, forks,
aborts and steps under block pressure (preemption included) never schedule a write into
a shared block, never leak or double-free a block, and free everything at the end."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.block_pool import NoFreeBlocksError
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from tests.engine.factories import fake_runner_output, make_request, make_scheduler


def _step_checked(scheduler) -> None:
    batch = scheduler.schedule()
    pool, bs = scheduler.kv.pool, scheduler.kv.block_size
    for entry in batch.scheduled:
        table = entry.request.block_ids
        for pos in range(entry.start, entry.start + entry.num_new_tokens):
            assert pool.ref_count(table[pos // bs]) == 1, "a shared block is written"
    scheduler.update(batch, fake_runner_output(batch))
    pool.check_integrity()


def _child(parent: Request, rid: str) -> Request:
    return Request(rid, list(parent.prompt_token_ids), SamplingParams(max_tokens=12), (2,))


def test_fork_shares_the_prompt_and_frees_with_the_last_sibling():
    scheduler = make_scheduler(num_blocks=16, block_size=4)
    parent = make_request("p", 10, max_tokens=6)
    scheduler.add_request(parent)
    _step_checked(scheduler)  # the prompt's 10 tokens: 3 blocks, the last one partial
    assert parent.num_computed_tokens == 10
    copies = [scheduler.fork(parent, _child(parent, f"c{i}")) for i in range(3)]
    # each child recomputes token 9, in the shared block 2: it gets its own copy
    assert copies == [(2, 3), (2, 4), (2, 5)] and scheduler.kv.pool.ref_count(0) == 4
    while scheduler.has_unfinished():
        _step_checked(scheduler)
    assert scheduler.kv.pool.num_free == 16


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "fork", "abort", "step"]),
                          st.integers(1, 30)), max_size=40))
def test_random_forks_aborts_and_steps_keep_the_pool_sound(ops):
    scheduler = make_scheduler(num_blocks=14, block_size=4, max_num_batched_tokens=16,
                               max_num_seqs=6)
    ids = 0
    for op, n in ops:
        ids += 1
        running = [r for r in scheduler.running
                   if r.num_computed_tokens >= r.num_prompt_tokens]
        if op == "add":
            # at most 30 + 20 tokens: 13 blocks, so every request fits alone
            scheduler.add_request(make_request(f"r{ids}", n, max_tokens=1 + 3 * n % 20))
        elif op == "fork" and running and scheduler.has_seat():
            parent = running[n % len(running)]
            try:
                scheduler.fork(parent, _child(parent, f"r{ids}"))
            except NoFreeBlocksError:  # only a full pool refuses
                assert scheduler.kv.pool.num_free == 0
        elif op == "abort" and scheduler.requests:
            victim = sorted(scheduler.requests)[n % len(scheduler.requests)]
            scheduler.finish(victim, RequestStatus.FINISHED_ABORTED)
        else:
            _step_checked(scheduler)
        scheduler.kv.pool.check_integrity()
    for _ in range(500):
        if not scheduler.has_unfinished():
            break
        _step_checked(scheduler)
    assert not scheduler.has_unfinished()
    assert scheduler.kv.pool.num_free == scheduler.kv.pool.num_blocks
