"""Tensor parallelism on real gloo process groups against TP=1 on the same saved weights."""
import functools
import json
import multiprocessing
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from workbench.errors import WorkbenchError
from workbench.models.config import LlamaConfig
from workbench.models.llama import Llama
from workbench.runtime import launch, tp
from workbench.runtime.checkpoint import load_llama, save_llama
from workbench.runtime.generate import generate
from workbench.runtime.session import RunSpec, run, run_local
from workbench.runtime.tokenizer import ByteTokenizer

pytestmark = pytest.mark.slow

# Three prompts of different lengths: prefill has 3 x 11 = 33 token rows and decode 3, so the
# reduce-scatter pads to a multiple of the world size in both phases.
PROMPTS = [[256, 5, 17, 33], [256, 99, 41, 7, 8, 9, 10, 11, 12, 13, 14], [256, 3, 4]]
STEPS = 6


def tiny_config(**kw) -> LlamaConfig:
    base = dict(vocab_size=260, d_model=64, n_layers=2, n_heads=8, n_kv_heads=4, d_ff=128, max_seq_len=256,
                attention_bias=True, mlp_bias=True, bos_id=256, eos_id=257)
    base.update(kw)
    return LlamaConfig(**base)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(3)
    model = Llama(tiny_config())
    with torch.no_grad():  # biases and norm weights off their defaults, so a rank adding a bias twice shows
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(0.0, 0.2)
    path = tmp_path_factory.mktemp("tp_llama")
    save_llama(model, path, tokenizer=ByteTokenizer(260, 256, 257))
    return path


def _greedy_with_logits(model):
    """Greedy tokens and the logits of every step; layer 0's attention partial/reduced sum at prefill."""
    logits, attn_sum, cache_heads = [], {}, set()

    def keep_logits(x, hp):
        logits.append(x[:, -1].clone())

    def keep_sum(x, hp):
        if model.info.step == 0:
            attn_sum[hp.name.rsplit(".", 1)[1]] = x.clone()

    sites = ["layers.0.attn_allreduce.partial", "layers.0.attn_allreduce.reduced"]
    with model.listening("logits", keep_logits), model.listening(sites, keep_sum):
        res = generate(model, PROMPTS, STEPS, sampler=tp.RankZeroSampler() if model.info.world > 1 else None,
                       on_step=lambda ev: cache_heads.add(ev.cache.k.shape[3]))
    attn_sum["cache_heads"] = cache_heads
    return res.generated, torch.stack(logits), attn_sum


def _rank_compare(model_dir, ctx: launch.RankContext):
    """On every rank: shard, run both algorithms on one sharded model, with and without listeners."""
    model = load_llama(model_dir)
    tp.shard_model(model, ctx.rank, ctx.world, algorithm="allreduce")
    out = {"heads": (model.layers[0].attn.n_heads, model.layers[0].attn.n_kv_heads)}
    for algorithm in tp.ALGORITHMS:
        tp.install_collective(model, algorithm, ctx.rank, ctx.world)
        timings = []
        with model.listening("layers.*_allreduce.timing", lambda t, hp: timings.append(dict(t, site=hp.name))):
            tokens, logits, attn_sum = _greedy_with_logits(model)
        plain_tokens, plain_logits, _ = _greedy_with_logits(model)  # no timing listener: same numbers
        every_rank = [None] * ctx.world
        dist.all_gather_object(every_rank, tokens)
        out[algorithm] = dict(tokens=tokens, logits=logits, attn_sum=attn_sum, timings=timings,
                              every_rank=every_rank, plain_tokens=plain_tokens, plain_logits=plain_logits)
    return out


@pytest.fixture(scope="module")
def reference(model_dir):
    return _greedy_with_logits(load_llama(model_dir))


@pytest.mark.parametrize("world", [2, 4])
def test_tp_matches_tp1_for_both_algorithms(model_dir, reference, world):
    ref_tokens, ref_logits, ref_sum = reference
    out = launch.launch(world, functools.partial(_rank_compare, str(model_dir)))
    assert out["heads"] == (8 // world, 4 // world)
    assert out["allreduce"]["attn_sum"]["cache_heads"] == {4 // world}  # each rank caches its own KV heads
    for algorithm in tp.ALGORITHMS:
        got = out[algorithm]
        assert got["tokens"] == ref_tokens, algorithm
        assert all(t == ref_tokens for t in got["every_rank"]), f"{algorithm}: ranks disagree"
        diff = (got["logits"] - ref_logits).abs().max().item()
        assert diff < 1e-4, f"{algorithm}: logits differ from TP=1 by {diff}"
        assert got["plain_tokens"] == ref_tokens
        assert torch.equal(got["plain_logits"], got["logits"])  # listening changes nothing
        # Timing: one record per unit per step, from the collective itself.
        assert len(got["timings"]) == STEPS * 2 * 2
        first = got["timings"][0]
        assert first["algorithm"] == algorithm and first["end_ns"] >= first["start_ns"] and first["bytes"] > 0
        assert {t["site"] for t in got["timings"]} == {f"layers.{i}.{u}_allreduce.timing"
                                                       for i in range(2) for u in ("attn", "mlp")}
    # Both algorithms give the same numbers (same tokens above; logits to float rounding).
    between = (out["allreduce"]["logits"] - out["reduce_scatter"]["logits"]).abs().max().item()
    assert between < 1e-5
    # The all-reduce materialises the full sum: it equals TP=1's unsharded attention output.
    reduced = out["allreduce"]["attn_sum"]["reduced"]
    assert (reduced - ref_sum["partial"]).abs().max().item() < 1e-5
    # Reduce-scatter never holds the full sum, so it does not fire hook_reduced.
    assert "reduced" not in out["reduce_scatter"]["attn_sum"]
    # A rank's partial sum alone is not the full sum (the shards really are partial).
    assert (out["allreduce"]["attn_sum"]["partial"] - ref_sum["partial"]).abs().max().item() > 1e-3


def test_session_run_streams_rank0_steps(model_dir):
    prompts = ["hello", "a longer prompt here"]
    ref = run_local(RunSpec(model=str(model_dir), prompts=prompts, max_new_tokens=5, device="cpu"))
    events = []
    spec = RunSpec(model=str(model_dir), prompts=prompts, max_new_tokens=5, device="cpu", tp=2,
                   tp_algorithm="reduce_scatter")
    res = run(spec, on_step=events.append)
    assert res.generated == ref.generated and res.texts == ref.texts
    assert [e.step for e in events] == list(range(5))
    assert [e.tokens for e in events] == [list(t) for t in zip(*ref.generated)]
    assert all(e.cache is None and e.cand_probs.shape == (2, 5) for e in events)
    assert multiprocessing.active_children() == []


def test_cli_generate_tp2_streams_text(model_dir):
    ref = run_local(RunSpec(model=str(model_dir), prompts=["def f(x):"], max_new_tokens=8, device="cpu"))
    proc = subprocess.run([sys.executable, "-m", "workbench.cli", "generate", "--model", str(model_dir),
                           "--prompt", "def f(x):", "--max-new-tokens", "8", "--tp", "2",
                           "--tp-algorithm", "allreduce"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "def f(x):" + ref.texts[0] + "\n"  # printed once, by rank 0 only
    assert "[8 steps" in proc.stderr


def test_not_divisible_is_an_error_before_any_process(model_dir):
    with pytest.raises(WorkbenchError, match="attention heads 8 is not divisible by 3"):
        run(RunSpec(model=str(model_dir), prompts=["x"], max_new_tokens=2, tp=3))
    assert multiprocessing.active_children() == []
    proc = subprocess.run([sys.executable, "-m", "workbench.cli", "generate", "--model", str(model_dir),
                           "--prompt", "x", "--tp", "16"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("workbench: error: cannot shard over 16 ranks: attention heads 8 is not "
                                   "divisible by 16")


@pytest.mark.parametrize("kw, world, what", [
    (dict(n_heads=8, n_kv_heads=2), 4, "key/value heads 2"),
    (dict(d_ff=130), 4, "MLP width (intermediate_size) 130"),
    (dict(n_heads=6, n_kv_heads=6, d_model=60), 4, "attention heads 6"),
])
def test_check_shardable_names_the_dimension(kw, world, what):
    with pytest.raises(WorkbenchError, match=rf"cannot shard over {world} ranks: {what.replace('(', '.').replace(')', '.')}"):
        tp.check_shardable(tiny_config(**kw), world)
    tp.check_shardable(tiny_config(), 4)


def test_unknown_algorithm_is_an_error(model_dir):
    with pytest.raises(WorkbenchError, match="unknown tensor-parallel algorithm 'ring'"):
        run(RunSpec(model=str(model_dir), prompts=["x"], max_new_tokens=2, tp=2, tp_algorithm="ring"))


def test_head_ranges_cover_every_head_once():
    owned = [h for r in range(4) for h in tp.head_range(8, r, 4)]
    assert owned == list(range(8))


def test_torchrun_runs_the_same_code(model_dir):
    prompts = ["hello", "a longer prompt here"]
    ref = run_local(RunSpec(model=str(model_dir), prompts=prompts, max_new_tokens=5, device="cpu"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "workbench.cli", "generate", "--model", str(model_dir), "--max-new-tokens", "5", "--json",
           "--tp-algorithm", "reduce_scatter", *[a for p in prompts for a in ("--prompt", p)]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1  # only rank 0 prints
    assert json.loads(lines[0])["generated_ids"] == ref.generated
