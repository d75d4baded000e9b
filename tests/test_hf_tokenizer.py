"""Hugging Face tokenizer.json checkpoints: each token's text as a trace records it.

Two tokenizers are trained here with the `tokenizers` library, in the two styles Llama checkpoints
ship: SentencePiece-style BPE with byte fallback, whose decoder strips a text's first space (Llama
2, TinyLlama), and byte-level BPE (Llama 3). The expected texts come from the vocabulary pieces
themselves, not from decoding.
"""
from __future__ import annotations

import io
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from workbench.models.config import LlamaConfig
from workbench.models.llama import Llama
from workbench.runtime.checkpoint import save_llama
from workbench.runtime.generate import generate
from workbench.runtime.session import RunSpec, TextStreamer, load_model, run
from workbench.runtime.tokenizer import BYTE_LEVEL, HFTokenizer
from workbench.trace.reader import open_trace

CORPUS = ["def fib(n):", "    return fib(n - 1) + fib(n - 2)", "the end of the file", "if x == y:"] * 20
SAMPLE = "def fib(n):\n    return the é"


def sentencepiece_style() -> Tokenizer:
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=320, special_tokens=specials))
    return tok


def byte_level_style() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=320, special_tokens=["<|end|>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def piece_bytes(piece: str, style: str) -> bytes:
    """What a vocabulary piece stands for, read off the piece."""
    if style == "sentencepiece":
        if piece.startswith("<0x") and piece.endswith(">"):
            return bytes([int(piece[3:-1], 16)])
        return piece.replace("▁", " ").encode()
    return bytes(BYTE_LEVEL[c] for c in piece)


@pytest.fixture(params=["sentencepiece", "byte_level"])
def tokenizer_file(request, tmp_path):
    tok = sentencepiece_style() if request.param == "sentencepiece" else byte_level_style()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return request.param, tok, path


def test_each_token_shows_the_text_it_adds(tokenizer_file):
    style, raw, path = tokenizer_file
    tok = HFTokenizer(path, None, None)
    ids = tok.encode(SAMPLE)
    texts = [tok.token_text(i) for i in ids]
    expected = [piece_bytes(raw.id_to_token(i), style).decode("utf-8", errors="backslashreplace") for i in ids]
    assert texts == expected
    assert any(t.startswith(" ") and len(t) > 1 for t in texts)  # words keep their leading space
    assert "\\xc3" in texts and "\\xa9" in texts  # é is two byte tokens in both vocabularies
    joined = "".join(texts).replace("\\xc3\\xa9", "é")
    # SentencePiece-style text starts with the space its normalizer put in front (decoding strips it)
    assert joined == (" " if style == "sentencepiece" else "") + tok.decode(ids)


def test_streamed_text_keeps_the_space_before_the_first_new_token(tokenizer_file):
    style, _, path = tokenizer_file
    tok = HFTokenizer(path, None, None)
    prompt = "def fib(n):"
    full = tok.encode(prompt + " return the end")
    new = full[len(tok.encode(prompt)):]
    if style == "sentencepiece":  # decoded alone, the first new token loses its space
        assert not tok.decode(new[:1]).startswith(" ")
    out = io.StringIO()
    stream = TextStreamer(tok, out, context=tok.encode(prompt))
    for i, t in enumerate(new):
        stream(SimpleNamespace(tokens=[t], finished=[i == len(new) - 1]))
    assert out.getvalue() == " return the end"


def test_generated_text_and_stop_strings_keep_the_first_space(tmp_path):
    raw = sentencepiece_style()
    raw.save(str(tmp_path / "tokenizer.json"))
    tok = HFTokenizer(tmp_path / "tokenizer.json", None, None)
    prompt = tok.encode("def fib(n):")
    cfg = LlamaConfig(vocab_size=raw.get_vocab_size(), d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                      max_seq_len=64, bos_id=None, eos_id=None)
    for seed in range(100):  # a model whose first new token is a word: a piece that starts with ▁
        torch.manual_seed(seed)
        model = Llama(cfg).eval()
        free = generate(model, [prompt], 6, decode=tok.decode)
        first = free.generated[0][0]
        if raw.id_to_token(first).startswith("▁") and len(raw.id_to_token(first)) > 1:
            break
    else:
        pytest.fail("no seed gave a first token with a leading space")
    text = free.texts[0]
    assert text == tok.decode(prompt + free.generated[0])[len(tok.decode(prompt)):] and text.startswith(" ")
    word = tok.token_text(first)  # " xyz": it ends the text at the first step
    stopped = generate(model, [prompt], 6, decode=tok.decode, stop_strings=[word])
    assert stopped.finish_reasons == ["stop"] and stopped.generated[0] == [first] and stopped.texts == [""]


def test_a_recording_names_hf_tokens_as_they_read(tokenizer_file, tmp_path):
    style, raw, path = tokenizer_file
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=raw.get_vocab_size(), d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                      max_seq_len=64, bos_id=None, eos_id=None)
    model_dir = tmp_path / "model"
    save_llama(Llama(cfg), model_dir)
    (model_dir / "tokenizer.json").write_bytes(path.read_bytes())
    _, tok = load_model(model_dir, torch.device("cpu"))
    assert isinstance(tok, HFTokenizer)
    run(RunSpec(model=str(model_dir), prompts=[SAMPLE], max_new_tokens=4, record=str(tmp_path / "t.zarr"),
                device="cpu", probes=("sampler",)))
    tokens = open_trace(tmp_path / "t.zarr").tokens
    ids = tok.encode(SAMPLE)
    assert list(tokens.text.values[0, :len(ids)]) == [tok.token_text(i) for i in ids]
    assert list(tokens.vocab_text.values) == [tok.token_text(i) for i in range(cfg.vocab_size)]


LLAMA3_STYLE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                "{{ m['content'] }}<|eot_id|>{% endfor %}"
                "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@pytest.fixture
def chat_model(tmp_path):
    raw = byte_level_style()
    raw.add_special_tokens(SPECIALS)
    model_dir = tmp_path / "chat-model"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=raw.get_vocab_size(), d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                      max_seq_len=96, bos_id=None, eos_id=None)
    save_llama(Llama(cfg), model_dir)
    raw.save(str(model_dir / "tokenizer.json"))
    return raw, model_dir


def _tokenizer_config(model_dir, template):
    (model_dir / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "bos_token": "<|begin_of_text|>", "eos_token": {"content": "<|eot_id|>"}}))


def test_chat_lays_the_prompt_out_with_the_checkpoints_template(chat_model, tmp_path):
    from workbench.replay import verify
    raw, model_dir = chat_model
    _tokenizer_config(model_dir, LLAMA3_STYLE)
    run(RunSpec(model=str(model_dir), prompts=["hi there"], max_new_tokens=3, device="cpu", chat=True,
                record=str(tmp_path / "chat.zarr"), probes=("sampler",)))
    meta = open_trace(tmp_path / "chat.zarr").metadata
    laid_out = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi there<|eot_id|>"
                "<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = meta["prompt_ids"][0]
    assert meta["chat"] and ids == raw.encode(laid_out, add_special_tokens=False).ids
    assert ids[0] == raw.token_to_id("<|begin_of_text|>") and ids.count(raw.token_to_id("<|eot_id|>")) == 1
    plain = run(RunSpec(model=str(model_dir), prompts=["hi there"], max_new_tokens=3, device="cpu"))
    assert plain.prompt_ids[0] == raw.encode("hi there").ids != ids
    assert verify(tmp_path / "chat.zarr").ok


def test_a_chat_replays_from_the_ids_it_read(chat_model, tmp_path):
    """A template may name the time (Llama 3.1 writes today's date): replay uses the recorded ids."""
    from workbench.replay import verify
    _, model_dir = chat_model
    _tokenizer_config(model_dir, "{{ bos_token }}{{ strftime_now('%H:%M:%S.%f') }} " + LLAMA3_STYLE)
    run(RunSpec(model=str(model_dir), prompts=["hi"], max_new_tokens=4, device="cpu", chat=True,
                record=str(tmp_path / "timed.zarr"), probes=("sampler",)))
    report = verify(tmp_path / "timed.zarr")
    assert report.ok and report.steps_checked == 4


def test_chat_without_a_template_is_a_one_line_error(chat_model):
    _, model_dir = chat_model
    proc = subprocess.run([sys.executable, "-m", "workbench.cli", "generate", "--model", str(model_dir), "--chat",
                           "--prompt", "hi", "--max-new-tokens", "2"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"workbench: error: --chat: {model_dir} has no chat template "
                                                "(chat_template in tokenizer_config.json or chat_template.jinja)"]
