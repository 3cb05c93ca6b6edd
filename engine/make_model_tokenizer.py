"""The tokenizer of generated models: a byte-level BPE trained here, on a built-in corpus.

``train_tokenizer(vocab_size, add_bos)`` trains it (well under a second, deterministic: same
corpus and size give the same tokenizer.json); ``save_tokenizer`` writes tokenizer.json,
tokenizer_config.json (ChatML chat template with Qwen-style tool calling, class
``PreTrainedTokenizerFast`` so transformers 4 and 5 both load it) and special_tokens_map.json.

Special tokens take ids 0..4 (``SPECIAL_TOKENS`` order); the 256 byte symbols follow; merges
after. Llama/Mistral-style tokenizers prepend <|begin_of_text|>, Qwen-style ones do not.

The corpus: embedded text (English prose, code, JSON, several languages, emoji) plus seeded
procedural text (sentences from word lists, pseudo-words, identifiers, numbers), so that:
- training needs no download and gives the same tokenizer on every machine and Python version
  (stdlib docstrings would change between Python releases, so they are not used);
- the merges include real English and code pieces, and non-ASCII characters (accents, CJK,
  emoji) become multi-byte token sequences, which exercises the detokenizer's partial-UTF-8 path;
- there are enough distinct words for a few thousand merges.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Iterator
from pathlib import Path

SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>", "<|pad|>")
"""bos, eos, chat turn start, chat turn end, padding: ids 0..4 in every generated tokenizer."""

# ChatML with Qwen2.5-style tool calling; `bos` is prepended for tokenizers that add it (the
# template's text is encoded with add_special_tokens=False, as transformers'
# apply_chat_template does). Content may be a string or a list of OpenAI-style parts
# ({"type": "text", "text": ...}). With `tools`, a system turn lists them (JSON, one per line)
# and asks for Hermes-style calls; an assistant's `tool_calls` are written as
# <tool_call>{"name": ..., "arguments": ...}</tool_call> blocks and a `tool` message as a
# <tool_response> in a user turn, so a conversation with calls round-trips. As Qwen3's does,
# `enable_thinking=false` (chat_template_kwargs) writes an empty <think> block after the
# assistant's opening.
_CHAT_TEMPLATE = (
    "{%- macro text(content) %}"
    "{%- if content is string %}{{- content }}"
    "{%- elif content %}{%- for part in content %}{{- part['text'] }}{%- endfor %}"
    "{%- endif %}"
    "{%- endmacro %}"
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- text(messages[0]['content']) + '\\n\\n' }}"
    "{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.'"
    " + '\\n\\nYou are provided with function signatures within <tools></tools> XML tags:'"
    " + '\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name'"
    " + ' and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n'"
    " + '{\"name\": <function-name>, \"arguments\": <args-json-object>}\\n</tool_call>'"
    " + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and loop.first and tools %}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + text(message['content'])"
    " + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + text(message['content']) }}"
    "{%- for call in message.get('tool_calls') or [] %}"
    "{%- set fn = call['function'] if call['function'] is defined else call %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + fn['name'] + '\", \"arguments\": ' }}"
    "{%- if fn['arguments'] is string %}{{- fn['arguments'] }}"
    "{%- else %}{{- fn['arguments'] | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def special_token_ids() -> dict[str, int]:
    """Ids of the special tokens by role: bos, eos, im_start, im_end, pad."""
    roles = ("bos", "eos", "im_start", "im_end", "pad")
    return {role: i for i, role in enumerate(roles)}


def chat_template(add_bos: bool) -> str:
    return ("{{- bos_token }}" if add_bos else "") + _CHAT_TEMPLATE


def train_tokenizer(vocab_size: int, add_bos: bool):  # -> tokenizers.Tokenizer
    """Train the byte-level BPE on ``corpus_lines()``; may stop below ``vocab_size`` if the
    corpus runs out of merges (it reaches 8192). Cached per process (a fresh object each call)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(_trained_json(vocab_size, add_bos))


@functools.lru_cache(maxsize=8)
def _trained_json(vocab_size: int, add_bos: bool) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines(), trainer)
    if add_bos:
        bos = SPECIAL_TOKENS[0]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, 0)]
        )
    return tok.to_str()


def save_tokenizer(tok, out_dir: Path, add_bos: bool, max_len: int) -> None:
    """Write ``tok`` (from ``train_tokenizer``) and its transformers config into ``out_dir``."""
    tok.save(str(out_dir / "tokenizer.json"))
    bos, eos, im_start, im_end, pad = SPECIAL_TOKENS
    special = {"bos_token": bos, "eos_token": eos, "pad_token": pad,
               "additional_special_tokens": [im_start, im_end]}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": add_bos,
        "add_eos_token": False,
        # False keeps decode() a pure concatenation ("a ." stays "a ."): streaming relies on it.
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
        "chat_template": chat_template(add_bos),
    }
    _write_json(out_dir / "tokenizer_config.json", config)
    _write_json(out_dir / "special_tokens_map.json", special)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")

PROSE = """\
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
A language model reads a prompt, turns it into a cache of keys and values, and then writes
one token at a time. Serving many users at once means batching their requests together,
sharing the memory of the cache in fixed-size blocks, and never letting a long prompt stall
everyone else. That is why the prompt phase and the generation phase are split apart.
It was a bright cold day in April, and the clocks were striking thirteen.
In the beginning the universe was created. This has made a lot of people very angry and been
widely regarded as a bad move.
All happy families are alike; each unhappy family is unhappy in its own way.
Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in
my purse, and nothing particular to interest me on shore, I thought I would sail about a little
and see the watery part of the world.
The weather today is sunny with a light breeze from the west. Tomorrow we expect rain in the
afternoon, followed by clearing skies in the evening. Temperatures will range from 12 to 19
degrees Celsius.
Please remember to submit your report by Friday, October 3rd, 2025 at 5:00 PM. If you have any
questions, contact the help desk at support@example.com or call +1 (555) 010-2030.
Scientists measured the speed of light as 299,792,458 metres per second; the gravitational
constant is about 6.674e-11 N*m^2/kg^2, and pi is roughly 3.14159265358979.
Q: What is the capital of France? A: The capital of France is Paris.
Q: How many legs does a spider have? A: A spider has eight legs.
User: Can you summarize this article in two sentences?
Assistant: Sure. The article explains how disaggregated serving separates prefill from decode,
and shows that doing so lowers the time to first token under heavy load.
Once upon a time, in a kingdom by the sea, there lived a curious engineer who wanted to know
why the queue was always full at noon. She measured, she plotted, and then she fixed it.
"""

CODE = '''\
def fibonacci(n: int) -> list[int]:
    """Return the first n Fibonacci numbers."""
    a, b = 0, 1
    out = []
    for _ in range(n):
        out.append(a)
        a, b = b, a + b
    return out


class BlockAllocator:
    def __init__(self, num_blocks: int) -> None:
        self.free = list(range(num_blocks))
        self.ref_count = [0] * num_blocks

    def allocate(self) -> int:
        if not self.free:
            raise RuntimeError("out of blocks")
        block = self.free.pop(0)
        self.ref_count[block] = 1
        return block


import torch
x = torch.randn(4, 8, dtype=torch.float32)
y = torch.nn.functional.softmax(x @ x.T / 8 ** 0.5, dim=-1)
print(f"shape={tuple(y.shape)} sum={y.sum().item():.3f}")

for (let i = 0; i < items.length; i++) {
  const item = items[i];
  if (item.done === true) { console.log(`done: ${item.name}`); continue; }
  await fetch("/api/v1/items/" + item.id, { method: "POST", body: JSON.stringify(item) });
}

#include <stdio.h>
int main(int argc, char **argv) {
    for (int i = 0; i < argc; ++i) printf("%d: %s\\n", i, argv[i]);
    return 0;
}

SELECT user_id, COUNT(*) AS n FROM requests WHERE status = 'ok' GROUP BY user_id ORDER BY n DESC;
{"model": "splitserve-tiny", "prompt": "Hello", "max_tokens": 16, "stream": true}
{"id": "cmpl-42", "choices": [{"index": 0, "text": " world", "finish_reason": "length"}]}
$ curl -s http://localhost:8000/v1/models | jq '.data[].id'
git commit -m "Fix off-by-one in the slot mapping" && git push origin main
<div class="card"><h1>Title</h1><p>Some <b>bold</b> text &amp; a <a href="#">link</a>.</p></div>
# Heading
- item one
- item two with `inline code` and **bold** text
| name | value |
|------|-------|
| ttft | 0.25s |
'''

MULTILINGUAL = """\
Français : Le café est très chaud, mais la crème brûlée est déjà prête. Où est la gare ?
Deutsch: Die Straße ist schön, und die Bäume blühen im Frühling. Größer, höher, weiter!
Español: ¿Dónde está la biblioteca? El niño comió una manzana en el jardín. ¡Qué día!
Português: A tradução não é fácil, mas é possível. Obrigado pela atenção, até amanhã.
Italiano: Perché la città è così bella? Perché è piena di storia e di caffè.
Polski: Zażółć gęślą jaźń. Dziękuję bardzo za pomoc.
Türkçe: Günaydın! Bugün hava çok güzel, değil mi? Teşekkür ederim.
Русский: Съешь же ещё этих мягких французских булок, да выпей чаю. Привет, мир!
Ελληνικά: Καλημέρα κόσμε. Η γλώσσα είναι ελληνική και ο ήλιος λάμπει.
中文：今天天气很好，我们去公园散步吧。机器学习模型需要大量的数据和计算资源。
日本語：こんにちは世界。東京は日本の首都です。ラーメンとお寿司が大好きです。
한국어: 안녕하세요, 세계! 오늘은 날씨가 정말 좋네요. 감사합니다.
العربية: مرحبا بالعالم. اللغة العربية جميلة جدا.
हिन्दी: नमस्ते दुनिया। आज मौसम बहुत अच्छा है।
ไทย: สวัสดีชาวโลก วันนี้อากาศดีมาก
Tiếng Việt: Xin chào thế giới. Hôm nay trời đẹp quá!
Emoji: 😀 😃 😄 🚀 🔥 ✨ 👍🏽 🎉 ❤️ 🇫🇷 👨‍👩‍👧‍👦 🐍 🤖 ☕ 🌍
Symbols: ∑ ∫ √ ≈ ≠ ≤ ≥ ∞ € £ ¥ © ® ™ … — – « » “ ” ‘ ’
Math: ∀x ∈ ℝ, x² ≥ 0; α + β = γ; e^{iπ} + 1 = 0; Δt ≈ 3.5 ms; 90° angle; ½ + ¼ = ¾.
"""

# Word lists for procedural sentences (seeded, so the corpus is the same everywhere).
_SUBJECTS = "the model|a request|the scheduler|our router|each worker|the cache|a user|the team|\
this function|the benchmark|every block|the server|my friend|the cat|a small bird".split("|")
_VERBS = "reads|writes|sends|receives|schedules|measures|returns|computes|stores|frees|\
allocates|streams|checks|waits for|prints|builds|loads|saves|tests|finds".split("|")
_OBJECTS = "the tokens|a batch|the prompt|new blocks|the answer|a message|its output|the logits|\
the weights|a report|the results|every sequence|the queue|a number|the data".split("|")
_ADVERBS = "quickly|slowly|carefully|again|today|at once|in parallel|on time|twice|later".split("|")
_SYLLABLES = (
    "ka ri to na me so lu vi da pe ko ra ti ne mu sa lo fi de po ba gu zi he we ya "
    "ther ing tion ent con pro ver str ble ight ous ment ness able ally ize ward wise "
    "qu ph ch sh th ck gh ng st tr pl gr br cl fl sp sc sk sm sn sw tw wr"
).split()
_IDENT_PARTS = (
    "get set num max min block token seq len id cache kv head layer batch size rank "
    "world step time start end buf ptr idx count total free used hash table map slot"
).split()


def _sentences(rng: random.Random, n: int) -> Iterator[str]:
    for _ in range(n):
        words = [rng.choice(_SUBJECTS), rng.choice(_VERBS), rng.choice(_OBJECTS)]
        if rng.random() < 0.5:
            words.append(rng.choice(_ADVERBS))
        text = " ".join(words)
        yield text[0].upper() + text[1:] + rng.choice([".", "!", "?", ";", ",", ":"])


def _pseudo_words(rng: random.Random, n: int) -> Iterator[str]:
    for _ in range(n):
        word = "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4)))
        yield word.capitalize() if rng.random() < 0.2 else word


def _identifiers(rng: random.Random, n: int) -> Iterator[str]:
    for _ in range(n):
        parts = [rng.choice(_IDENT_PARTS) for _ in range(rng.randint(1, 3))]
        style = rng.random()
        if style < 0.5:
            ident = "_".join(parts)
        elif style < 0.8:
            ident = parts[0] + "".join(p.capitalize() for p in parts[1:])
        else:
            ident = "".join(p.capitalize() for p in parts)
        yield f"{ident} = {rng.randint(0, 99999)}"


def corpus_lines(seed: int = 20240607, num_procedural: int = 3000) -> list[str]:
    """The training corpus as lines; independent of the model seed so all models of a preset
    share one tokenizer. Takes well under a second to build."""
    rng = random.Random(seed)
    lines = (PROSE + CODE + MULTILINGUAL).splitlines()
    # The embedded text is repeated so its words win the early merges over the pseudo-words.
    lines = lines * 8
    lines += list(_sentences(rng, num_procedural))
    words = list(_pseudo_words(rng, num_procedural))
    lines += [" ".join(words[i : i + 12]) for i in range(0, len(words), 12)]
    lines += list(_identifiers(rng, num_procedural // 2))
    return lines
