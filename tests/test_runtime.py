"""Runtime pieces on their own: paged KV cache accounting, sampler, stop conditions, streaming, CLI errors."""
import io
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.models.config import LlamaConfig
from workbench.models.llama import Llama
from workbench.runtime.checkpoint import save_llama
from workbench.runtime.generate import generate
from workbench.runtime.kv_cache import CacheFullError, PagedKVCache
from workbench.runtime.sampler import Sampler, SamplerConfig
from workbench.runtime.session import TextStreamer
from workbench.runtime.tokenizer import ByteTokenizer

CFG = dict(vocab_size=259, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64,
           bos_id=256, eos_id=257)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny")
    save_llama(Llama(LlamaConfig(**CFG)), path, ByteTokenizer())
    return path


def test_kv_cache_reports_tokens_blocks_and_bytes():
    torch.manual_seed(0)
    model = Llama(LlamaConfig(**CFG)).eval()
    seen = []
    generate(model, [[1] * 5, [2] * 11], 8, block_size=4, on_step=lambda e: seen.append(e.cache.stats()))
    per_token = 2 * 2 * 8 * 4  # K and V, 2 kv heads, head_dim 8, float32
    # After step s: lengths 5+s and 11+s tokens -> ceil(./4) blocks each (prefill pads to 11 for both).
    for s, st in enumerate(seen):
        tokens = (5 + s) + (11 + s)
        blocks = max(3, -(-(5 + s + 1) // 4)) + -(-(11 + s + 1) // 4) if s else 3 + 3
        assert st.tokens == tokens
        assert st.bytes_used == tokens * per_token
        assert st.bytes_reserved == st.blocks * 4 * per_token
        assert st.bytes_reserved >= st.bytes_used
    assert seen[0].blocks == 6  # both sequences were written up to position 10 in the padded prefill


def test_kv_cache_full_is_a_clear_error():
    model = Llama(LlamaConfig(**CFG)).eval()
    with pytest.raises(CacheFullError, match="KV cache is full"):
        generate(model, [[1] * 10], 10, block_size=4, num_blocks=3)


def test_top_k_and_top_p_filter_the_distribution():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    p = Sampler(SamplerConfig(temperature=1.0, top_k=2)).probabilities(logits)
    assert (p[0, 2:] == 0).all() and torch.isclose(p.sum(), torch.tensor(1.0))
    p = Sampler(SamplerConfig(temperature=1.0, top_p=0.7)).probabilities(logits)  # p = .64, .23, .09, ...
    assert (p[0] > 0).tolist() == [True, True, False, False, False]
    p = Sampler(SamplerConfig(temperature=1.0, top_p=0.6)).probabilities(logits)
    assert (p[0] > 0).tolist() == [True, False, False, False, False]
    greedy = Sampler(SamplerConfig()).sample(logits)
    assert greedy.tokens.tolist() == [0] and greedy.cand_ids[0].tolist() == [0, 1, 2, 3, 4]


def test_stop_on_eos_and_stop_strings():
    torch.manual_seed(0)
    model = Llama(LlamaConfig(**CFG)).eval()
    free = generate(model, [[1, 2, 3]], 10).generated[0]
    res = generate(model, [[1, 2, 3]], 10, stop_ids=[free[3]])
    assert res.generated[0] == free[:free.index(free[3]) + 1] and res.finish_reasons == ["eos"]
    tok = ByteTokenizer()
    target = tok.decode(free[2:4])
    res = generate(model, [[1, 2, 3]], 10, stop_strings=[target], decode=tok.decode)
    assert res.finish_reasons == ["stop"] and target not in res.texts[0]
    with pytest.raises(WorkbenchError, match="a stop string must not be empty"):  # "" would end it at once
        generate(model, [[1, 2, 3]], 10, stop_strings=["\n", ""], decode=tok.decode)


def test_a_checkpoint_stops_at_every_end_token_it_names(tmp_path):
    """config.json's eos_token_id may be a list (Llama 3 Instruct), and generation_config.json may
    name more: generation stops at any of them, as transformers' generate does."""
    from workbench.runtime.session import RunSpec, run
    torch.manual_seed(0)
    path = tmp_path / "m"
    save_llama(Llama(LlamaConfig(**{**CFG, "eos_id": None})), path, ByteTokenizer(eos_id=None))
    prompt = "ab"
    free = run(RunSpec(model=str(path), prompts=[prompt], max_new_tokens=12, device="cpu")).generated[0]
    assert len(free) == 12
    config = json.loads((path / "config.json").read_text())
    for end, where in ((free[4], "config"), (free[6], "generation_config")):
        unused = next(i for i in range(256) if i not in free)
        if where == "config":
            config["eos_token_id"] = [unused, end]
            (path / "config.json").write_text(json.dumps(config))
        else:
            config["eos_token_id"] = unused
            (path / "config.json").write_text(json.dumps(config))
            (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [unused, end]}))
        res = run(RunSpec(model=str(path), prompts=[prompt], max_new_tokens=12, device="cpu"))
        assert res.generated[0] == free[:free.index(end) + 1] and res.finish_reasons == ["eos"], where
    (path / "generation_config.json").write_text("{not json")
    proc = _cli("generate", "--model", str(path), "--prompt", prompt, "--max-new-tokens", "2")
    assert proc.returncode == 2 and "generation_config.json is not a readable generation config" in proc.stderr
    assert "Traceback" not in proc.stderr


def files_and_times(store):
    """Every file of a store with its modification time: equal before and after = untouched."""
    return sorted((p.relative_to(store), p.stat().st_mtime_ns) for p in store.rglob("*"))


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "workbench.cli", *args], capture_output=True, text=True, timeout=120)


class SpaceMarkTokenizer:
    """SentencePiece-like: "_" marks a space, and a text never starts with one."""

    vocab = ["_the", "_cat", "s", "_sat", ".", "_on", "_a", "_mat"]

    def decode(self, ids):
        return "".join(self.vocab[i] for i in ids).replace("_", " ").removeprefix(" ")


class CountingDecodes:
    def __init__(self, tok):
        self.tok, self.longest = tok, 0

    def decode(self, ids):
        self.longest = max(self.longest, len(ids))
        return self.tok.decode(ids)


@pytest.mark.parametrize("tok, ids", [
    (ByteTokenizer(), list("héllo wörld, 日本語 — ok\n".encode())),
    (SpaceMarkTokenizer(), [0, 1, 2, 3, 5, 6, 7, 4] * 30),
])
def test_streamed_text_is_the_decoded_text_from_short_windows(tok, ids):
    out = io.StringIO()
    counting = CountingDecodes(tok)
    stream = TextStreamer(counting, out)
    for t in ids:
        stream(SimpleNamespace(tokens=[t], finished=[False]))
    assert out.getvalue() == tok.decode(ids)
    assert counting.longest <= 8  # two characters at most (4 bytes each), not the whole text


def test_cli_says_where_the_trace_is_and_how_to_see_it(model_dir, tmp_path):
    from workbench.trace.reader import open_trace
    trace = tmp_path / "my runs" / "t.zarr"
    trace.parent.mkdir()
    out = subprocess.run([sys.executable, "-m", "workbench.cli", "generate", "--model", str(model_dir),
                          "--prompt", "ab", "--max-new-tokens", "3", "--record", str(trace), "--probes", "light"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert f"`workbench serve '{trace}'`" in last, last  # quoted: the path has a space
    assert open_trace(trace).status == "complete"
    # Bad input on a second run over the same path is refused before the trace is touched.
    before = files_and_times(trace)
    out = _cli("generate", "--model", str(model_dir), "--prompt", "ab", "--max-new-tokens", "3", "--record", str(trace),
               "--overwrite", "--stop", "")
    assert out.returncode == 2 and out.stderr.strip() == "workbench: error: a stop string must not be empty"
    assert files_and_times(trace) == before


@pytest.mark.parametrize("bad, message", [
    (dict(max_new_tokens=0), "max new tokens must be >= 1"), (dict(block_size=0), "KV cache block size must be >= 1"),
    (dict(tp=0), "tensor-parallel size must be >= 1"), (dict(tp_algorithm="ring"), "unknown tensor-parallel algorithm"),
    (dict(stop_strings=[""]), "a stop string must not be empty"), (dict(prompts=[]), "no prompt given"),
])
def test_a_bad_run_spec_is_refused_before_the_trace_it_would_replace_is_touched(model_dir, tmp_path, bad, message):
    from workbench.runtime.session import RunSpec, run
    trace = tmp_path / "t.zarr"
    spec = dict(model=str(model_dir), prompts=["ab"], max_new_tokens=3, record=str(trace), probes=["sampler"])
    run(RunSpec(**spec))
    before = files_and_times(trace)
    with pytest.raises(WorkbenchError, match=message):
        run(RunSpec(**{**spec, "overwrite": True, **bad}))
    assert files_and_times(trace) == before


def test_cli_json_output(model_dir):
    out = _cli("generate", "--model", str(model_dir), "--prompt", "ab", "--prompt", "cde",
               "--max-new-tokens", "4", "--json")
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    assert d["prompt_ids"] == [[256, 97, 98], [256, 99, 100, 101]]
    assert [len(g) for g in d["generated_ids"]] == [4, 4]
    assert d["timings"]["steps"] == 4 and d["timings"]["decode_tokens_per_second"] > 0


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/dir"], "does not exist"),
    (["--max-new-tokens", "0"], "expected a number >= 1"),
    (["--temperature", "-1"], "expected a number >= 0"),
    (["--top-p", "2"], "top-p must be in (0, 1]"),
    (["--prompt", "x" * 80, "--max-new-tokens", "4"], "exceeds the model's context of 64"),
    (["--stop", ""], "a stop string must not be empty"),
])
def test_cli_bad_input_is_one_line_exit_2(model_dir, args, message):
    if "--model" not in args:
        args = ["--model", str(model_dir), *args]
    out = _cli("generate", *args)
    assert out.returncode == 2
    assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "Traceback" not in out.stderr


def test_cli_rejects_unsupported_architecture_and_bad_shapes(model_dir, tmp_path):
    cfg = json.loads((model_dir / "config.json").read_text())
    bad = tmp_path / "bert"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**cfg, "architectures": ["BertModel"], "model_type": "bert"}))
    out = _cli("generate", "--model", str(bad))
    assert out.returncode == 2 and "unsupported architecture 'BertModel'" in out.stderr
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "model.safetensors").write_bytes((model_dir / "model.safetensors").read_bytes())
    (wrong / "config.json").write_text(json.dumps({**cfg, "hidden_size": 48, "head_dim": 12}))
    out = _cli("generate", "--model", str(wrong))
    assert out.returncode == 2 and "has shape" in out.stderr and "config implies" in out.stderr


def test_bad_arm_layer_under_tp_fails_before_any_rank_starts(model_dir):
    out = _cli("generate", "--model", str(model_dir), "--tp", "2", "--arm", "--arm-layers", "7", "--max-new-tokens", "4")
    assert out.returncode == 2 and out.stderr.strip() == \
        "workbench: error: ARM layer 7 does not exist: the model has 2 layers (0..1)"
