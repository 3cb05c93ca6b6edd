"""Offline throughput: our Engine (continuous batching) vs transformers' static batching.

Same generated model, same requests, same process, measured side by side: 64 requests,
prompt lengths uniform in [32, 512], output lengths uniform in [16, 256] with ignore_eos,
fixed seed. transformers runs ``generate`` on padded batches of 16 (left padding, greedy);
only each request's own output tokens are counted. Each side is repeated (median reported)
and the ratio ours / transformers is printed and written to JSON. Each repetition builds a
fresh engine and runs its start-up ``warmup()``; the first repetition (the process's first
work) is also reported against the median of the others.

    python benchmarks/engine_throughput.py --preset small --reps 3
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch


def make_workload(n: int, vocab: int, seed: int, prompt_range, output_range):
    rng = random.Random(seed)
    prompts, outputs = [], []
    for _ in range(n):
        plen = rng.randint(*prompt_range)
        prompts.append([rng.randrange(10, vocab) for _ in range(plen)])
        outputs.append(rng.randint(*output_range))
    return prompts, outputs


def run_ours(model_dir, prompts, out_lens, args) -> tuple[float, int, float]:
    from engine import Engine, SamplingParams

    engine = Engine.from_pretrained(
        model_dir, dtype=args.dtype, device=args.device, block_size=args.block_size,
        max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs,
        load_tokenizer=False,
    )
    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in out_lens]
    # The workers' own start-up warm-up (it caches no prefix: the timed run gets no
    # prefix-cache hits, and transformers has no prefix cache). --no-warmup shows the cost
    # of skipping it: the first repetition runs slower than the others.
    if not args.no_warmup:
        warm_s = engine.warmup()
        print(f"  warm-up {warm_s:.2f} s", flush=True)
    t0, c0 = time.perf_counter(), time.process_time()
    outs = engine.generate(prompts, params)
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    produced = sum(len(o.token_ids) for o in outs)
    assert produced == sum(out_lens), "engine produced a different token count"
    return elapsed, produced, cpu


def run_transformers(model_dir, prompts, out_lens, args) -> tuple[float, int, float]:
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, args.dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(args.device).eval()
    pad = 0
    model.generate(torch.tensor([prompts[0][:8]], device=args.device), max_new_tokens=2,
                   do_sample=False, pad_token_id=pad)  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    counted = 0
    for i in range(0, len(prompts), args.hf_batch_size):
        batch, lens = prompts[i : i + args.hf_batch_size], out_lens[i : i + args.hf_batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=args.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch],
                            device=args.device)
        new = max(lens)
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                                 min_new_tokens=new, do_sample=False, pad_token_id=pad)
        assert out.shape[1] == width + new
        counted += sum(lens)  # each request's own output tokens only
    return time.perf_counter() - t0, counted, time.process_time() - c0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model dir (default: generated --arch/--preset, cached)")
    ap.add_argument("--arch", default="llama")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--prompt-range", type=int, nargs=2, default=(32, 512))
    ap.add_argument("--output-range", type=int, nargs=2, default=(16, 256))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--max-num-batched-tokens", type=int, default=512)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--hf-batch-size", type=int, default=16)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--no-warmup", action="store_true",
                    help="skip Engine.warmup() (what the workers run at start-up)")
    ap.add_argument("--out", default="results/engine_throughput.json")
    args = ap.parse_args()

    from engine.make_model import ensure_model
    from engine.model_config import ModelConfig

    model_dir = (Path(args.model) if args.model
                 else ensure_model(args.arch, args.preset, 0, dtype=args.dtype))
    cfg = ModelConfig.from_pretrained(model_dir)
    prompts, out_lens = make_workload(args.num_requests, cfg.vocab_size, args.seed,
                                      args.prompt_range, args.output_range)
    sides = {"splitserve": run_ours}
    if not args.skip_transformers:
        sides["transformers"] = run_transformers
    runs: dict[str, list[float]] = {k: [] for k in sides}
    # Tokens per CPU second of this process: on a machine shared with other load, wall time
    # swings with the neighbours; CPU time (with one torch thread) measures our own work.
    cpu_runs: dict[str, list[float]] = {k: [] for k in sides}
    for rep in range(args.reps):  # interleaved, so drifting machine load hits both sides
        for name, fn in sides.items():
            elapsed, tokens, cpu = fn(model_dir, prompts, out_lens, args)
            runs[name].append(tokens / elapsed)
            cpu_runs[name].append(tokens / cpu)
            print(f"rep {rep}: {name:12s} {tokens} tokens in {elapsed:7.2f} s = "
                  f"{tokens / elapsed:8.1f} tok/s ({tokens / cpu:8.1f} per CPU s)", flush=True)
    result = {
        "model": str(model_dir), "arch": cfg.architecture, "preset": args.preset,
        "params_millions": _param_count(cfg) / 1e6, "dtype": args.dtype, "device": args.device,
        "num_requests": args.num_requests, "prompt_range": args.prompt_range,
        "output_range": args.output_range, "reps": args.reps, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "machine": platform.machine(),
        "output_tokens_per_s": {k: statistics.median(v) for k, v in runs.items()},
        "all_runs": runs, "warmup": not args.no_warmup,
        "first_rep_vs_rest": {k: _first_vs_rest(v) for k, v in runs.items()},
        "output_tokens_per_cpu_s": cpu_runs,
        "first_rep_vs_rest_cpu": {k: _first_vs_rest(v) for k, v in cpu_runs.items()},
    }
    tps = result["output_tokens_per_s"]
    print(f"\nmodel {cfg.architecture} ({result['params_millions']:.1f} M params), {args.dtype}, "
          f"{args.device}, {args.num_requests} requests, median of {args.reps}")
    for name, v in tps.items():
        print(f"  {name:12s} {v:8.1f} output tok/s")
    for key, unit in (("first_rep_vs_rest", "tok/s"), ("first_rep_vs_rest_cpu", "tok/CPU s")):
        for name, cmp in result[key].items():
            if cmp is not None:
                print(f"  {name:12s} first rep {cmp['first']:8.1f} {unit} vs median of the "
                      f"others {cmp['rest_median']:8.1f}: {100 * (cmp['ratio'] - 1):+.1f} %")
    if "transformers" in tps:
        result["ratio"] = tps["splitserve"] / tps["transformers"]
        print(f"  ratio splitserve / transformers = {result['ratio']:.2f}x")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


def _first_vs_rest(runs: list[float]) -> dict | None:
    """The first repetition (the process's first work) against the median of the others:
    with the start-up warm-up, ratio should be within 10 % of 1."""
    if len(runs) < 2:
        return None
    rest = statistics.median(runs[1:])
    return {"first": runs[0], "rest_median": rest, "ratio": runs[0] / rest}


def _param_count(cfg) -> int:
    h, L, v = cfg.hidden_size, cfg.num_layers, cfg.vocab_size
    attn = h * cfg.head_dim * (cfg.num_heads * 2 + cfg.num_kv_heads * 2)
    mlp = 3 * h * cfg.intermediate_size
    emb = v * h * (1 if cfg.tie_word_embeddings else 2)
    return L * (attn + mlp) + emb


if __name__ == "__main__":
    main()
