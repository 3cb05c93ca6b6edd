"""make-model: generated checkpoints are genuine Hugging Face ones, deterministic, well-behaved."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from app.cli import main as cli_main
from engine.make_model import (
    FORMAT_VERSION,
    MARKER_FILE,
    PRESETS,
    MakeModelError,
    build_config,
    checkpoint_summary,
    ensure_model,
    make_model,
)
from engine.tokenizer import Tokenizer
from tests.conftest import TINY_MODELS

TEXTS = [
    "Hello world, the model reads the prompt.",
    "Le café est très chaud — déjà prêt? Größer!",
    "中文：今天天气很好。日本語のテキスト。한국어",
    "emoji 😀🚀👨‍👩‍👧‍👦 and math ∑ ≈ ∞ and a tab\tand\nnewline",
    "def f(x):\n    return x ** 2  # comment",
]


def weight_names(model_dir: Path) -> set[str]:
    names: set[str] = set()
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            names.update(f.keys())
    return names


@pytest.mark.parametrize("name", list(TINY_MODELS))
def test_tiny_model_loads_in_transformers_and_generates(tiny_model_dir, name):
    model_dir = tiny_model_dir(name)
    model, info = AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}  # no missing/unexpected/mismatched keys
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok("The scheduler reads the prompt", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=16, do_sample=False, min_new_tokens=16)
    new = out[0, ids.shape[1]:].tolist()
    assert len(new) == 16
    # The init must not collapse into repeating one token (weak engine-vs-HF comparisons).
    assert len(set(new)) >= 8, new


def test_architecture_features_are_present(tiny_model_dir):
    qwen2 = weight_names(tiny_model_dir("qwen2"))
    assert "model.layers.0.self_attn.q_proj.bias" in qwen2
    assert "lm_head.weight" not in qwen2  # tied to the embedding
    qwen3_dir = tiny_model_dir("qwen3")
    assert "model.layers.1.self_attn.k_norm.weight" in weight_names(qwen3_dir)
    qwen3 = json.loads((qwen3_dir / "config.json").read_text())
    assert qwen3["head_dim"] == 32 != qwen3["hidden_size"] // qwen3["num_attention_heads"]
    llama31 = json.loads((tiny_model_dir("llama3.1") / "config.json").read_text())
    assert llama31["rope_scaling"]["rope_type"] == "llama3"
    assert llama31["rope_parameters"]["factor"] == 8.0
    assert llama31["rope_theta"] == llama31["rope_parameters"]["rope_theta"] == 500000.0
    assert "lm_head.weight" in weight_names(tiny_model_dir("llama"))


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_greedy_logit_gaps_are_far_above_float_noise(tiny_model_dir, name):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(name)).eval()
    gen = torch.Generator().manual_seed(0)
    gaps = []
    with torch.no_grad():
        for length in (5, 17, 40):
            ids = torch.randint(5, 1024, (1, length), generator=gen)
            top2 = model(ids).logits[0].topk(2, dim=-1).values
            gaps.append(top2[:, 0] - top2[:, 1])
    gaps = torch.cat(gaps)
    assert gaps.median() > 0.2
    assert gaps.min() > 1e-4, gaps.min()


def test_same_seed_gives_identical_bytes(tmp_path):
    a = make_model(tmp_path / "a", "qwen2", "tiny", seed=7)
    b = make_model(tmp_path / "b", "qwen2", "tiny", seed=7)
    c = make_model(tmp_path / "c", "qwen2", "tiny", seed=8)
    for file in ("model.safetensors", "tokenizer.json", "config.json", "tokenizer_config.json"):
        assert (a / file).read_bytes() == (b / file).read_bytes(), file
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()


def test_sharded_checkpoint_matches_single_file(tmp_path, tiny_model_dir):
    sharded = make_model(tmp_path / "s", "llama", "tiny", seed=0, max_shard_bytes=200_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (sharded / "model.safetensors").exists()
    single = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).state_dict()
    loaded = AutoModelForCausalLM.from_pretrained(sharded).state_dict()
    assert single.keys() == loaded.keys()
    assert all(torch.equal(single[k], loaded[k]) for k in single)
    assert index["metadata"]["total_size"] == sum(v.numel() * 4 for v in single.values())


def test_bfloat16_and_rows_beyond_the_tokenizer(tmp_path):
    model_dir = make_model(tmp_path / "m", "llama", "tiny", dtype="bfloat16", vocab_size=1100)
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        emb, head = f.get_tensor("model.embed_tokens.weight"), f.get_tensor("lm_head.weight")
    assert emb.dtype == torch.bfloat16 and emb.shape == (1100, 64)
    assert head[1024:].abs().sum() == 0 and head[:1024].abs().min(dim=1).values.gt(0).all()
    assert json.loads((model_dir / "config.json").read_text())["dtype"] == "bfloat16"


def test_special_token_ids_agree_across_files(tiny_model_dir):
    for name, add_bos in (("llama", True), ("qwen3", False)):
        model_dir = tiny_model_dir(name)
        config = json.loads((model_dir / "config.json").read_text())
        gen = GenerationConfig.from_pretrained(model_dir)
        tok = AutoTokenizer.from_pretrained(model_dir)
        assert config["eos_token_id"] == gen.eos_token_id == [tok.eos_token_id, 3]
        assert tok.convert_ids_to_tokens(3) == "<|im_end|>"
        assert config["bos_token_id"] == gen.bos_token_id == tok.bos_token_id
        assert config["pad_token_id"] == gen.pad_token_id == tok.pad_token_id
        assert config["vocab_size"] == len(tok)
        assert (tok("hi").input_ids[0] == tok.bos_token_id) is add_bos


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_round_trips_text(tiny_model_dir, text):
    hf = AutoTokenizer.from_pretrained(tiny_model_dir("qwen2"))
    ours = Tokenizer(tiny_model_dir("qwen2"))
    ids = ours.encode(text)
    assert ids == hf.encode(text)
    assert ours.decode(ids) == hf.decode(ids) == text
    assert len(ids) < len(text.encode())  # merges were learned (not one token per byte)


def test_chat_template_renders(tiny_model_dir):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text",
                                                                      "text": "there"}]},
    ]
    for name, bos in (("llama", "<|begin_of_text|>"), ("qwen2", "")):
        tok = Tokenizer(tiny_model_dir(name))
        text = tok.chat_template_text(messages, add_generation_prompt=True)
        assert text == (f"{bos}<|im_start|>system\nBe brief.<|im_end|>\n"
                        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
        ids = tok.apply_chat_template(messages)
        assert ids.count(2) == 3 and ids.count(3) == 2  # <|im_start|>, <|im_end|> single tokens
        assert tok.decode(ids, skip_special_tokens=False) == text
        hf = AutoTokenizer.from_pretrained(tiny_model_dir(name))
        expected = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                          return_dict=True)["input_ids"]
        assert ids == list(expected)
        no_prompt = tok.chat_template_text(messages[:1], add_generation_prompt=False)
        assert no_prompt.endswith("<|im_end|>\n")


def test_unknown_config_field_and_bad_arguments(tmp_path):
    with pytest.raises(MakeModelError, match="unknown LlamaConfig field"):
        make_model(tmp_path / "a", "llama", "tiny", hiden_size=32)
    assert not (tmp_path / "a").exists()  # validated before anything is written
    with pytest.raises(MakeModelError, match="unknown dtype"):
        make_model(tmp_path / "b", "llama", "tiny", dtype="int8")
    with pytest.raises(MakeModelError, match="pass --arch qwen3"):
        make_model(tmp_path / "c", "llama", "qwen3-0.6b")


@pytest.mark.parametrize(
    ("preset", "expected_billions"),
    [("qwen2.5-0.5b", 0.494), ("llama-3.2-1b", 1.236), ("qwen3-0.6b", 0.596),
     ("mixtral-8x7b", 46.703), ("qwen3-30b-a3b", 30.532)],
)
def test_real_shape_presets_have_the_public_parameter_counts(preset, expected_billions):
    config = build_config(None, preset, tokenizer_size=8192)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count / 1e9 - expected_billions) < 0.005, count


def test_small_preset_size():
    config = build_config("llama", "small", tokenizer_size=4096)
    with torch.device("meta"):
        count = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    assert 3e6 < count < 8e6
    assert PRESETS["small"].tokenizer_vocab == config.vocab_size == 4096


def test_cli_make_model(tmp_path, capsys):
    out = tmp_path / "m"
    assert cli_main(["make-model", "--arch", "mistral", "--preset", "tiny", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    num_params, _ = checkpoint_summary(out)
    assert str(out) in stdout and f"{num_params:,}" in stdout
    assert cli_main(["make-model", "--arch", "mistral", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not empty" in err and "--force" in err
    assert cli_main(["make-model", "--arch", "mistral", "--out", str(out), "--force"]) == 0
    for argv, message in [(["--arch", "gpt2"], "unknown arch"),
                          (["--preset", "huge"], "unknown preset"),
                          (["--dtype", "int4"], "unknown dtype")]:
        assert cli_main(["make-model", *argv, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err


def test_ensure_model_builds_once_atomically(tmp_path):
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(
        ensure_model("qwen3", "tiny", 3, cache_dir=tmp_path))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results[0] == results[1] == tmp_path / "qwen3-tiny-seed3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qwen3-tiny-seed3"]  # no temp dirs
    marker = results[0] / MARKER_FILE
    mtime = marker.stat().st_mtime_ns
    assert ensure_model("qwen3", "tiny", 3, cache_dir=tmp_path) == results[0]
    assert marker.stat().st_mtime_ns == mtime  # reused, not rebuilt
    stale = json.loads(marker.read_text()) | {"format_version": FORMAT_VERSION - 1}
    marker.write_text(json.dumps(stale))
    ensure_model("qwen3", "tiny", 3, cache_dir=tmp_path)
    assert json.loads(marker.read_text())["format_version"] == FORMAT_VERSION


@pytest.mark.parametrize(("arch", "expert_tensor"), [
    ("mixtral", "model.layers.1.block_sparse_moe.experts.7.w3.weight"),
    ("qwen3_moe", "model.layers.1.mlp.experts.7.up_proj.weight"),
    ("qwen2_moe", "model.layers.0.mlp.shared_expert.up_proj.weight"),
])
def test_cli_writes_moe_checkpoints_transformers_loads(tmp_path, capsys, arch, expert_tensor):
    """MoE checkpoints hold one tensor per expert, as on the Hub and as transformers 5 saves
    them (it stacks experts only in memory), and transformers loads every one of them."""
    out = tmp_path / arch
    assert cli_main(["make-model", "--arch", arch, "--out", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    names = weight_names(out)
    assert expert_tensor in names
    assert not any(name.endswith(("gate_up_proj", "experts.down_proj")) for name in names)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}  # no missing/unexpected/mismatched keys
    assert type(model).__name__ == json.loads((out / "config.json").read_text())[
        "architectures"][0]
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("The scheduler reads the prompt", return_tensors="pt").input_ids
    new = model.generate(ids, max_new_tokens=16, do_sample=False, min_new_tokens=16)[
        0, ids.shape[1]:].tolist()
    assert len(set(new)) >= 8, new  # the random experts do not collapse into one token
