"""Per-step cost of structured-output masking: decode steps with every request constrained
by a JSON schema vs the same batch unconstrained, at batch 1, 16 and 64.

For each batch size: B requests are prefilled, then ``--steps`` decode steps are timed with
all B running (the schema, an array of at least 50 small objects, cannot finish within
them; the unconstrained side uses ignore_eos). The constrained step does everything the
engine does for a grammar: fill one bitmask for the batch (xgrammar, C++), apply it to the
logits, advance each request's matcher by its token. Both sides run greedy, in the same
process, interleaved over ``--reps`` repetitions (median reported), so machine load drifts
hit both. Each side reports the fastest and the median step: on a shared machine the
fastest step is the steadier estimate of what a step costs, and the overhead is computed
from it (the medians are written too). The grammar's own work per step (fill and apply the
bitmask, advance each matcher; no model) is timed alone as well, also for logits as wide
as a real model's (``--wide-vocab``, Qwen2.5's 151936 by default: applying the mask costs
per logit, filling it per tokenizer entry), and the first compilation of the schema.

    python benchmarks/structured_output.py --preset small --reps 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

ITEM = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 12},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "role": {"enum": ["admin", "user", "guest"]},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3}},
    "required": ["name", "age", "role", "tags"]}
SCHEMA = {"type": "array", "items": ITEM, "minItems": 50}


def _engine(model_dir, args):
    from engine import Engine

    return Engine.from_pretrained(model_dir, dtype=args.dtype, device=args.device,
                                  block_size=16, max_num_batched_tokens=2048,
                                  max_num_seqs=64, load_tokenizer=False)


def time_decode_steps(engine, batch: int, constrained: bool, args) -> list[float]:
    """Seconds of each of ``args.steps`` decode steps with ``batch`` requests running."""
    from engine import SamplingParams
    from engine.structured import StructuredSpec

    spec = StructuredSpec.json_schema(SCHEMA) if constrained else None
    params = SamplingParams(max_tokens=args.steps + 8, temperature=0.0, structured=spec,
                            ignore_eos=not constrained)
    vocab = engine.model_config.vocab_size
    for i in range(batch):  # distinct prompts: no prefix-cache sharing between rows
        engine.add_request(None, [(7 * i + j) % (vocab - 10) + 10 for j in range(32)], params)
    while any(r.num_output_tokens == 0 for r in engine.scheduler.requests.values()):
        engine.step()  # prefills (their first token sampled)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
        assert engine.last_batch.num_decodes == batch, "a request finished early"
    for request_id in list(engine.scheduler.requests):
        engine.abort(request_id)
    return times


def time_grammar_work(engine, batch: int, args, backend=None) -> list[float]:
    """Seconds of one step's grammar work for ``batch`` rows, ``args.steps`` times: fill
    and apply the bitmask, advance each row's matcher by its argmax (not timed: the argmax,
    which an unconstrained step does too)."""
    from engine.sampler import Sampler
    from engine.structured import StructuredSpec

    backend = backend or engine.grammar_backend()
    states = [backend.new_state(StructuredSpec.json_schema(SCHEMA)) for _ in range(batch)]
    masker = Sampler(engine.device)._grammar_masker()
    logits = torch.randn(batch, backend.vocab_size, device=engine.device)
    times = []
    for _ in range(args.steps):
        step_logits = logits.clone()
        t0 = time.perf_counter()
        masker.apply(step_logits, states)
        t1 = time.perf_counter()
        tokens = step_logits.argmax(dim=-1).tolist()
        t2 = time.perf_counter()
        for state, token in zip(states, tokens, strict=True):
            assert state.accept(token)
        times.append(t1 - t0 + time.perf_counter() - t2)
    return times


def time_compile(engine) -> dict:
    from engine.structured.grammar import build_grammar
    from engine.structured.spec import StructuredSpec

    t0 = time.perf_counter()
    backend = engine.grammar_backend()
    setup = time.perf_counter() - t0
    spec = StructuredSpec.json_schema({**SCHEMA, "minItems": 49})  # not compiled before
    build_grammar.cache_clear()
    t0 = time.perf_counter()
    backend.compile(spec.kind, spec.spec)
    return {"tokenizer_setup_s": setup, "compile_schema_ms": 1e3 * (time.perf_counter() - t0)}


def measure(engine, batch: int, args) -> dict:
    """Fastest and median step (ms) of each side over all repetitions, interleaved."""
    runs: dict[str, list[float]] = {"unconstrained": [], "constrained": [], "grammar_work": []}
    for _ in range(args.reps):
        runs["unconstrained"] += time_decode_steps(engine, batch, False, args)
        runs["constrained"] += time_decode_steps(engine, batch, True, args)
        runs["grammar_work"] += time_grammar_work(engine, batch, args)
    fastest = {k: 1e3 * min(v) for k, v in runs.items()}
    return {
        "min_ms": fastest,
        "median_ms": {k: 1e3 * statistics.median(v) for k, v in runs.items()},
        "overhead_pct": 100 * (fastest["constrained"] / fastest["unconstrained"] - 1),
        "grammar_work_pct_of_step": 100 * fastest["grammar_work"] / fastest["unconstrained"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model dir (default: generated --arch/--preset, cached)")
    ap.add_argument("--arch", default="llama")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--wide-vocab", type=int, default=151936)
    ap.add_argument("--out", default="results/structured_output.json")
    args = ap.parse_args()

    from engine.make_model import ensure_model

    model_dir = (Path(args.model) if args.model
                 else ensure_model(args.arch, args.preset, 0, dtype=args.dtype))
    engine = _engine(model_dir, args)
    result = {"model": str(model_dir), "preset": args.preset, "dtype": args.dtype,
              "device": args.device, "vocab_size": engine.model_config.vocab_size,
              "steps": args.steps, "reps": args.reps, "torch": torch.__version__,
              "threads": torch.get_num_threads(), "machine": platform.machine(),
              **time_compile(engine), "batches": {}}
    for batch in args.batches:
        result["batches"][str(batch)] = row = measure(engine, batch, args)
        print(f"batch {batch:3d}: step {row['min_ms']['unconstrained']:7.2f} -> "
              f"{row['min_ms']['constrained']:7.2f} ms ({row['overhead_pct']:+5.1f} %; medians "
              f"{row['median_ms']['unconstrained']:.2f} -> {row['median_ms']['constrained']:.2f})"
              f"; grammar work {row['min_ms']['grammar_work']:6.3f} ms "
              f"({row['grammar_work_pct_of_step']:4.1f} % of a step)", flush=True)
    from engine.structured.grammar import backend_for

    wide = backend_for(str(model_dir.resolve()), args.wide_vocab, engine.eos_token_ids)
    result["wide_vocab"] = {"vocab_size": args.wide_vocab, "grammar_work_min_ms": {}}
    for batch in args.batches:
        work = 1e3 * min(time_grammar_work(engine, batch, args, wide))
        result["wide_vocab"]["grammar_work_min_ms"][str(batch)] = work
        print(f"batch {batch:3d}, logits {args.wide_vocab} wide: grammar work {work:7.3f} ms")
    print(f"tokenizer info + compiler: {result['tokenizer_setup_s']:.2f} s once per process; "
          f"compiling the schema: {result['compile_schema_ms']:.1f} ms")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
