"""`splitserve make-model`: write a random-weight Hugging Face checkpoint of a real architecture.

    splitserve make-model --arch qwen3 --preset tiny --seed 0 --out /tmp/qwen3-tiny
    splitserve make-model --preset small            # into ~/.cache/splitserve/models/...
    splitserve make-model --arch mixtral --out /tmp/mixtral-tiny   # 8 experts, top-2
    splitserve make-model --preset llama-3.2-1b --dtype bfloat16 --out /data/llama-1b
"""

from __future__ import annotations

import argparse
import sys

# Kept in sync with engine.make_model (which imports torch lazily; this list keeps --help light).
ARCHS = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe", "qwen2_moe")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "make-model",
        help="write a random-weight Hugging Face checkpoint (tests, benchmarks, demo)",
        description="Write a random-weight Hugging Face checkpoint of a real architecture: "
        "config, safetensors weights, a locally trained tokenizer with a chat template.",
    )
    parser.add_argument("--arch", default=None,
                        help=f"one of {', '.join(ARCHS)} (default: the preset's, else llama)")
    parser.add_argument("--preset", default="tiny",
                        help="tiny, tiny-llama3.1, small, or a real model's shape: "
                        "llama-3.2-1b, llama-3.1-8b, mistral-7b, qwen2.5-0.5b, qwen2.5-7b, "
                        "qwen3-0.6b, qwen3-8b, mixtral-8x7b, qwen3-30b-a3b (default: tiny)")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default 0)")
    parser.add_argument("--out", default=None,
                        help="output directory (default: the cache, "
                        "~/.cache/splitserve/models/<arch>-<preset>-seed<seed>)")
    parser.add_argument("--dtype", default="float32",
                        help="float32 (default), bfloat16 or float16")
    parser.add_argument("--force", action="store_true",
                        help="overwrite the checkpoint files of a non-empty --out directory")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from engine.make_model import MakeModelError, checkpoint_summary, ensure_model, make_model

    try:
        if args.out is None:
            path = ensure_model(args.arch, args.preset, args.seed, args.dtype)
        else:
            path = make_model(args.out, args.arch, args.preset, args.seed, args.dtype,
                              overwrite=args.force)
    except MakeModelError as exc:
        print(f"splitserve make-model: error: {exc}", file=sys.stderr)
        return 2
    num_params, num_bytes = checkpoint_summary(path)
    print(f"{path}\n  parameters: {num_params:,} ({_human(num_params, '')})"
          f"\n  size: {_human(num_bytes, 'B')}")
    return 0


def _human(value: float, unit: str) -> str:
    for prefix in ("", "K", "M", "G"):
        if value < 1000:
            return f"{value:.1f} {prefix}{unit}".strip()
        value /= 1000.0
    return f"{value:.1f} T{unit}"
