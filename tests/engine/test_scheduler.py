"""Scheduler bookkeeping with a fake runner: exact block ids, budgets, preemption, caching."""

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.request import RequestStatus
from tests.engine.factories import (
    fake_runner_output,
    make_request,
    make_scheduler,
    run_to_completion,
)


def test_chunked_prefill_respects_budget_and_samples_once():
    s = make_scheduler(block_size=4, max_num_batched_tokens=8)
    r = make_request("a", prompt_len=20, max_tokens=2)
    s.add_request(r)
    chunks = []
    while r.num_output_tokens == 0:
        batch = s.schedule()
        assert batch.num_batched_tokens <= 8
        chunks.append([(e.start, e.num_new_tokens, e.sample) for e in batch.scheduled])
        s.update(batch, fake_runner_output(batch))
    assert chunks == [[(0, 8, False)], [(8, 8, False)], [(16, 4, True)]]
    assert r.block_ids == [0, 1, 2, 3, 4]  # exact ids: deterministic pool
    run_to_completion(s)
    assert r.status == RequestStatus.FINISHED_LENGTH
    assert s.kv.pool.num_free == 64


def test_decodes_come_first_then_prefill_chunks():
    s = make_scheduler(max_num_batched_tokens=16)
    s.add_request(make_request("a", prompt_len=3, max_tokens=5))
    s.update(b := s.schedule(), fake_runner_output(b))
    s.add_request(make_request("b", prompt_len=10, max_tokens=5, first_token=60))
    batch = s.schedule()
    assert [(e.request.request_id, e.num_new_tokens) for e in batch.scheduled] == [
        ("a", 1), ("b", 10)]
    assert batch.num_decodes == 1


def test_eos_and_stop_token_ids_finish_and_free():
    s = make_scheduler()
    r = make_request("a", prompt_len=5, max_tokens=10)
    r2 = make_request("b", prompt_len=5, max_tokens=10, stop_token_ids=[9], ignore_eos=True)
    s.add_request(r)
    s.add_request(r2)
    batch = s.schedule()
    s.update(batch, fake_runner_output(batch, token=2))  # EOS: stops a; b ignores EOS
    assert r.status == RequestStatus.FINISHED_STOPPED
    assert r2.status == RequestStatus.RUNNING
    batch = s.schedule()
    s.update(batch, fake_runner_output(batch, token=9))
    assert r2.status == RequestStatus.FINISHED_STOPPED
    assert not s.has_unfinished() and s.kv.pool.num_free == 64


def test_ignore_eos_and_min_tokens():
    s = make_scheduler()
    r = make_request("a", prompt_len=4, max_tokens=3, ignore_eos=True)
    s.add_request(r)
    run_to_completion(s, token=2)
    assert r.num_output_tokens == 3 and r.status == RequestStatus.FINISHED_LENGTH
    r = make_request("b", prompt_len=4, max_tokens=5, min_tokens=2)
    s.add_request(r)
    run_to_completion(s, token=2)
    assert r.num_output_tokens == 2 and r.status == RequestStatus.FINISHED_STOPPED


def test_prefix_cache_hit_skips_cached_blocks():
    s = make_scheduler(block_size=4, max_num_batched_tokens=64)
    a = make_request("a", prompt_len=13, max_tokens=1)
    s.add_request(a)
    run_to_completion(s)
    b = make_request("b", prompt_len=13, max_tokens=1)
    s.add_request(b)
    batch = s.schedule()
    # 13 tokens: 3 full blocks cached; the last block hit is capped below the last token.
    assert b.num_cached_tokens == 12
    assert [(e.start, e.num_new_tokens) for e in batch.scheduled] == [(12, 1)]
    assert b.block_ids[:3] == [0, 1, 2]  # the very blocks request a filled
    s.update(batch, fake_runner_output(batch))
    s.kv.pool.check_integrity()


def test_block_aligned_full_hit_recomputes_last_block():
    s = make_scheduler(block_size=4, max_num_batched_tokens=64)
    s.add_request(make_request("a", prompt_len=8, max_tokens=1))
    run_to_completion(s)
    b = make_request("b", prompt_len=8, max_tokens=1)
    s.add_request(b)
    batch = s.schedule()
    assert b.num_cached_tokens == 4 and batch.scheduled[0].num_new_tokens == 4
    assert b.block_ids[0] == 0 and b.block_ids[1] != 1  # never writes into a shared block


def test_preemption_frees_newest_and_recomputes():
    s = make_scheduler(num_blocks=6, block_size=4, max_num_batched_tokens=64, max_num_seqs=4)
    a = make_request("a", prompt_len=8, max_tokens=8)
    b = make_request("b", prompt_len=8, max_tokens=8, first_token=70)
    s.add_request(a)
    s.add_request(b)
    saw_preemption = False
    while s.has_unfinished():
        batch = s.schedule()
        saw_preemption |= bool(batch.preempted)
        if batch.preempted:
            assert batch.preempted[0] is b  # newest goes first
        s.update(batch, fake_runner_output(batch))
        s.kv.pool.check_integrity()
    assert saw_preemption and b.num_preemptions >= 1
    assert a.num_output_tokens == 8 and b.num_output_tokens == 8
    assert s.kv.pool.num_free == 6


def test_abort_frees_blocks_in_any_state():
    s = make_scheduler()
    s.add_request(make_request("a", prompt_len=9))
    s.add_request(make_request("b", prompt_len=9, first_token=70))
    s.update(b := s.schedule(), fake_runner_output(b))
    s.add_request(make_request("c", prompt_len=9))
    assert s.finish("a", RequestStatus.FINISHED_ABORTED).status == RequestStatus.FINISHED_ABORTED
    assert s.finish("c", RequestStatus.FINISHED_ABORTED) is not None  # still waiting
    assert s.finish("zzz", RequestStatus.FINISHED_ABORTED) is None
    run_to_completion(s)
    assert s.kv.pool.num_free == 64


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.tuples(st.sampled_from(["add", "step", "step", "step", "abort"]),
                  st.integers(1, 40), st.integers(1, 12)),
        max_size=80,
    ),
    budget=st.integers(1, 24),
    num_blocks=st.integers(12, 40),
)
def test_random_add_step_abort_never_leaks(ops, budget, num_blocks):
    s = make_scheduler(num_blocks=num_blocks, block_size=4, max_num_batched_tokens=budget,
                       max_num_seqs=5)
    n = 0
    for op, size, max_tokens in ops:
        if op == "add":
            # Keep requests satisfiable alone, as the engine's validation does.
            prompt = min(size, num_blocks * 4 - max_tokens - 4)
            s.add_request(make_request(f"r{n}", prompt, max_tokens, first_token=n % 7 * 10))
            n += 1
        elif op == "abort" and s.requests:
            victim = sorted(s.requests)[size % len(s.requests)]
            s.finish(victim, RequestStatus.FINISHED_ABORTED)
        else:
            batch = s.schedule()
            assert batch.num_batched_tokens <= budget
            assert len(batch.scheduled) <= 5
            ids = [e.request.request_id for e in batch.scheduled]
            assert len(ids) == len(set(ids))
            s.update(batch, fake_runner_output(batch))
        s.kv.pool.check_integrity()
        held = sum(len(r.block_ids) for r in s.running)
        assert held >= s.kv.pool.num_used - _shared_blocks(s)
    run_to_completion(s)
    assert s.kv.pool.num_free == num_blocks


def _shared_blocks(s) -> int:
    seen, shared = set(), 0
    for r in s.running:
        for b in r.block_ids:
            shared += b in seen
            seen.add(b)
    return shared
