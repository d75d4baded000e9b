"""The default models shipped in data/models, and the training loop that makes them (tiny configs)."""
import functools
import json
import math
import re

import numpy as np
import pytest
import torch

from workbench.cli import main
from workbench.errors import WorkbenchError
from workbench.runtime.generate import generate
from workbench.runtime.session import PROJECT_ROOT, load_model
from workbench.training.corpus import WindowSampler, build_corpus, eval_windows, is_held_out, stdlib_files
from workbench.training.train import TrainConfig, bits_per_byte, lr_at, train, train_and_save

MODELS = PROJECT_ROOT / "data" / "models"
DEFAULTS = {"llama": MODELS / "llama-bytes", "perceiver_ar": MODELS / "perceiver-ar-bytes"}
SHIPPED = [k for k, d in DEFAULTS.items() if (d / "train_report.json").exists()]
PROMPT = "import os\n\n\ndef read_file(path):\n    with open(path) as f:\n"
MARGIN = 0.35  # bits per byte: a 16-window sample against the report's 64-window figure


@pytest.fixture(scope="module")
def corpus():
    return build_corpus()


def tiny(**kw) -> TrainConfig:
    base = dict(minutes=None, steps=8, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, seq_len=64,
                max_seq_len=128, n_latents=32, batch_size=4, eval_every=4, eval_windows_final=4,
                progress=False, threads=1, lr=1e-2)
    base.update(kw)
    return TrainConfig(**base)


def test_the_llama_default_model_is_shipped():
    assert "llama" in SHIPPED, "data/models/llama-bytes has no train_report.json"


@pytest.mark.parametrize("kind", SHIPPED)
def test_default_model_generates_python_and_keeps_its_reported_bits_per_byte(kind, corpus):
    path = DEFAULTS[kind]
    report = json.loads((path / "train_report.json").read_text())
    assert report["model_kind"] == kind
    assert report["train_config"]["out"] == f"data/models/{path.name}"  # no machine's absolute paths
    assert report["heldout_bits_per_byte"] < report["unigram_bits_per_byte"]
    if kind == "llama":
        assert report["heldout_bits_per_byte"] < 2.5
    assert sum(f.stat().st_size for f in path.iterdir()) < 20e6

    model, tok = load_model(path, torch.device("cpu"))
    res = generate(model, [tok.encode(PROMPT)], 48, stop_ids=[tok.eos_id], decode=tok.decode)
    text = res.texts[0]
    assert len(res.generated[0]) == 48 and text.isascii() and text.strip()
    # A model of Python indents inside the with-block it was given.
    assert text.startswith(" " * 8), repr(text)

    seq_len = report["train_config"]["seq_len"]
    windows = eval_windows(corpus.heldout, seq_len, 16)
    bpb = bits_per_byte(model, windows)
    assert bpb < report["heldout_bits_per_byte"] + MARGIN, (bpb, report["heldout_bits_per_byte"])


# Prompts a new user meets first: the CLI's default, the README's and docs' examples, the bench's.
COMMON_PROMPTS = ["def fibonacci(n):\n", "class Stack:", "def fib(n):", "class Stack:\n    def __init__(self):\n",
                  "import os\nimport sys\n\n\ndef main(argv):\n    ", "def f(x):\n", "if x:\n", "import os\n"]
# Greedy continuations that are known to end in a run of spaces (docs/default-models.md); strict:
# a model that gets past one fails here, and the entry goes.
KNOWN_STUCK = {("llama", "class Stack:")}


def longest_space_run(text: str) -> int:
    return max((len(run) for run in re.findall(" +", text)), default=0)


@functools.lru_cache(maxsize=None)
def shipped_model(kind: str):
    return load_model(DEFAULTS[kind], torch.device("cpu"))


@pytest.mark.parametrize("kind, prompt", [
    pytest.param(kind, prompt, marks=[pytest.mark.xfail(strict=True, reason="greedy text gets stuck in spaces")]
                 if (kind, prompt) in KNOWN_STUCK else [])
    for kind in SHIPPED for prompt in COMMON_PROMPTS])
def test_default_model_greedy_text_from_common_prompts_is_code_not_a_run_of_spaces(kind, prompt):
    """Greedy decoding of a small byte model can get stuck in an indentation that never ends (the
    Llama model shipped before this test did so on three of these prompts, although its bits per
    byte were better than its predecessor's): each continuation holds code, and no run of spaces
    longer than deep Python indentation."""
    model, tok = shipped_model(kind)
    text = generate(model, [tok.encode(prompt)], 64, stop_ids=[tok.eos_id], decode=tok.decode).texts[0]
    assert longest_space_run(text) <= 20 and len(text.replace(" ", "").replace("\n", "")) >= 16, text


@pytest.mark.parametrize("kind", SHIPPED)
def test_default_model_side_files(kind):
    path = DEFAULTS[kind]
    for name in ("config.json", "model.safetensors", "workbench_tokenizer.json", "train_files.txt",
                 "loss_curve.csv", "loss_curve.svg"):
        assert (path / name).exists(), name
    listed = (path / "train_files.txt").read_text().splitlines()
    held = [line.split("\t")[1] for line in listed if line.startswith("heldout\t")]
    assert held and all(is_held_out(f) for f in held)
    rows = (path / "loss_curve.csv").read_text().splitlines()
    report = json.loads((path / "train_report.json").read_text())
    assert rows[0].startswith("step,") and len(rows) == report["steps"] + 1


def test_split_is_by_file_and_deterministic(corpus):
    root = corpus.root
    rels = [f.relative_to(root).as_posix() for f in stdlib_files(root)]
    assert corpus.heldout_files == [r for r in rels if is_held_out(r)]  # by file, from the path alone
    assert not set(corpus.train_files) & set(corpus.heldout_files)
    assert 0.02 < len(corpus.heldout_files) / (len(corpus.train_files) + len(corpus.heldout_files)) < 0.1
    assert all("/test/" not in f"/{f}" for f in corpus.train_files)
    assert len(rels) == len(corpus.train_files) + len(corpus.heldout_files)
    # The unigram baseline is the cross-entropy of held-out bytes under train frequencies.
    counts = np.bincount(corpus.train[corpus.train < 256], minlength=256) + 1.0
    held = corpus.heldout[corpus.heldout < 256]
    assert corpus.unigram_bits_per_byte() == pytest.approx(-np.log2(counts / counts.sum())[held].mean())


def test_lr_schedule_warms_up_then_decays():
    tc = tiny(lr=1.0, warmup=0.1, min_lr_ratio=0.1)
    assert lr_at(0.05, tc) == pytest.approx(0.5)
    assert lr_at(0.1, tc) == pytest.approx(1.0)
    assert lr_at(0.55, tc) == pytest.approx(0.55)
    assert lr_at(1.0, tc) == pytest.approx(0.1)


@pytest.fixture(scope="module")
def small_corpus():
    return build_corpus(max_files=40)


@pytest.mark.parametrize("kind", ["llama", "perceiver_ar"])
def test_training_lowers_the_loss_and_is_reproducible_from_the_seed(kind, small_corpus):
    a = train(tiny(model_kind=kind, steps=12), small_corpus, log=lambda s: None)
    b = train(tiny(model_kind=kind, steps=12), small_corpus, log=lambda s: None)
    c = train(tiny(model_kind=kind, steps=12, seed=1), small_corpus, log=lambda s: None)
    first = [r["train_bpb"] for r in a.curve[:3]]
    last = [r["train_bpb"] for r in a.curve[-3:]]
    assert first[0] == pytest.approx(math.log2(259), abs=0.1)  # uniform at init
    assert np.mean(last) < np.mean(first) - 1.0, (first, last)
    assert [r["train_bpb"] for r in a.curve] == [r["train_bpb"] for r in b.curve]
    for (n, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(p, q), n
    assert [r["train_bpb"] for r in a.curve] != [r["train_bpb"] for r in c.curve]
    assert a.report["steps"] == 12 and a.report["heldout_bits_per_byte"] < math.log2(259)


def _repeat_covering(row: np.ndarray, changed: np.ndarray) -> tuple[int, int, int] | None:
    """(first, second, length) of a printable run of 16-128 bytes that ``row`` holds twice, the
    second copy after the first, and whose two copies hold every ``changed`` position; or None."""
    n, printable = len(row), (row >= 32) & (row < 127)
    for gap in range(16, n):
        same = (row[:n - gap] == row[gap:]) & printable[:n - gap] & printable[gap:]
        edges = np.diff(np.concatenate([[0], same.astype(np.int8), [0]]))
        for first, end in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)):
            m = end - first
            covered = ((changed >= first) & (changed < end)) | ((changed >= first + gap) & (changed < end + gap))
            if 16 <= m <= gap + 2 and covered.all():  # a run may grow by a byte that matches by chance
                return int(first), int(first + gap), int(m)
    return None


def test_repeat_share_writes_a_random_string_twice_into_that_share_of_windows(small_corpus):
    stream = small_corpus.train
    # The same seed draws the same window starts first, so the plain windows show what was written.
    plain = WindowSampler(stream, 255, 64, seed=3).next_batch().numpy()
    batch = WindowSampler(stream, 255, 64, seed=3, repeat_share=1.0).next_batch().numpy()
    again = WindowSampler(stream, 255, 64, seed=3, repeat_share=1.0).next_batch().numpy()
    assert np.array_equal(batch, again)  # reproducible from the seed
    lengths = []
    for row, before in zip(batch, plain):
        changed = np.flatnonzero(row != before)
        assert changed.size >= 16
        found = _repeat_covering(row, changed)
        assert found is not None, changed
        lengths.append(found[2])
    assert min(lengths) >= 16 and max(lengths) <= 130 and len(set(lengths)) > 10  # lengths vary over 16-128
    plain = WindowSampler(stream, 255, 400, seed=4).next_batch().numpy()
    half = WindowSampler(stream, 255, 400, seed=4, repeat_share=0.5).next_batch().numpy()
    touched = (half != plain).any(axis=1).mean()
    assert 0.4 < touched < 0.6, touched
    with pytest.raises(WorkbenchError, match="repeat share"):
        WindowSampler(stream, 255, 4, seed=0, repeat_share=1.5)


def test_train_and_save_writes_a_loadable_checkpoint(tmp_path, small_corpus, monkeypatch):
    out = tmp_path / "m"
    lines = []
    report = train_and_save(tiny(out=str(out), max_files=40), log=lines.append)
    saved = json.loads((out / "train_report.json").read_text())
    assert saved["train_config"]["out"] == str(out)  # outside the project: kept as given
    assert saved["steps"] == 8 and saved["seed"] == 0 and saved["config"]["hidden_size"] == 32
    assert set(saved["best_heads"]) == {"previous_token", "induction"}
    assert np.array(saved["head_scores"]["induction"]).shape == (2, 4)
    assert report["heldout_bits_per_byte"] == saved["heldout_bits_per_byte"]
    text = "\n".join(lines)
    assert "held-out bits per byte" in text and "unigram baseline" in text
    assert "best previous-token head" in text and "best induction head" in text
    assert (out / "loss_curve.svg").read_text().startswith("<svg")
    model, tok = load_model(out, torch.device("cpu"))
    assert tok.bos_id == 256 and tok.eos_id == 257 and model.cfg.vocab_size == 259


def test_cli_train_rejects_bad_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--model-kind", "gpt"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["train", "--steps", "0"])
    assert e.value.code == 2
    capsys.readouterr()
    assert main(["train", "--minutes", "0"]) == 2
    assert "more than 0 minutes" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["train", "--repeat-share", "1.5"])
    assert e.value.code == 2
    assert "between 0 and 1" in capsys.readouterr().err
