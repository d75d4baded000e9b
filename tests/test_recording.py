"""Recording a real generation: values are right, TP=2 matches TP=1, live readers see prefixes."""
import math
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from workbench.models.config import LlamaConfig
from workbench.models.llama import Llama
from workbench.probes.selection import ProbeSelection
from workbench.runtime.checkpoint import load_llama, save_llama
from workbench.runtime.sampler import SamplerConfig
from workbench.runtime.session import RunSpec, run
from workbench.runtime.tokenizer import ByteTokenizer
from workbench.trace.reader import open_trace

from process_group import end_group, held, kill_leader_while_held

# A long context: the SIGKILL test starts a run far longer than it lets it get.
CFG = dict(vocab_size=259, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=4096,
           bos_id=256, eos_id=None)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("rec_model")
    save_llama(Llama(LlamaConfig(**CFG)), path, ByteTokenizer(bos_id=256, eos_id=None))
    return path


@pytest.fixture(scope="module")
def recorded(model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("traces") / "tp1.zarr"
    spec = RunSpec(model=str(model_dir), prompts=["hello world", "abc"], max_new_tokens=10, record=str(path),
                   device="cpu")
    result = run(spec)
    return path, result


def _full_forward(model_dir, seq_ids):
    """Recompute the whole sequence once, keeping attention maps and MLP activations."""
    model = load_llama(model_dir)
    maps, acts = {}, {}
    model.add_listener("layers.*.attn.pattern", lambda p, hp: maps.__setitem__(hp.layer, p[0].clone()))
    model.add_listener("layers.*.mlp.act.pre", lambda a, hp: acts.__setitem__(hp.layer, a[0].clone()))
    with torch.no_grad():
        model(torch.tensor([seq_ids]))
    return maps, acts


def test_trace_holds_tokens_and_complete_status(recorded):
    path, result = recorded
    tr = open_trace(path)
    assert tr.status == "complete" and tr.n_steps == 10
    tok = ByteTokenizer(bos_id=256, eos_id=None)
    for j, prompt in enumerate(["hello world", "abc"]):
        ids = tr.token_ids(j)
        assert ids.tolist() == tok.encode(prompt) + result.generated[j]
    assert tr.tokens.chosen.values[0].tolist() == result.generated[0]
    probs = tr.tokens.candidate_prob.values
    assert np.all(np.diff(probs, axis=-1) <= 1e-7) and np.all(probs.sum(-1) <= 1 + 1e-5)


def test_attention_rows_equal_model_softmax(recorded, model_dir):
    path, result = recorded
    tr = open_trace(path)
    tok = ByteTokenizer(bos_id=256, eos_id=None)
    for j, prompt in enumerate(["hello world", "abc"]):
        seq = tok.encode(prompt) + result.generated[j]
        maps, _ = _full_forward(model_dir, seq[:-1])  # the last token was never fed back
        n = len(seq) - 1
        for layer in range(2):
            for head in range(4):
                got = np.asarray(tr.attention_map(j, layer, head, step=9))[:n, :n]
                ref = maps[layer][head].numpy()
                assert np.allclose(np.nan_to_num(got), ref, atol=2e-3), (j, layer, head)  # float16 storage
                assert np.allclose(np.nansum(got, axis=1), 1.0, atol=5e-3)
        # Attention mass received per position at the last step = column sums of the new row over heads.
        mass = tr.kv_cache.attention_mass.values[j, 9, 0, 0, :n]
        assert np.allclose(mass, maps[0][:, n - 1, :].sum(0).numpy(), atol=1e-4)


def test_attention_steps_record_only_their_rows(model_dir, tmp_path):
    """--attention-steps 0,4,7: those steps' rows equal the model's softmax; the decode steps in
    between (batched with them) keep no row and no attention mass."""
    path = tmp_path / "steps.zarr"
    result = run(RunSpec(model=str(model_dir), prompts=["hello world"], max_new_tokens=10, record=str(path),
                         device="cpu", probes=ProbeSelection.parse("all", steps="0,4,7")))
    tr = open_trace(path)
    p = ByteTokenizer(bos_id=256, eos_id=None).encode("hello world")
    maps, _ = _full_forward(model_dir, (p + result.generated[0])[:-1])
    weights = tr.attention.weights.values[0, 0, 0]  # layer 0, head 0: [query, key]
    mass = tr.kv_cache.attention_mass.values[0, :, 0, 0]  # [step, position]
    for step in range(1, 10):
        q = len(p) + step - 1  # the query row a decode step computes
        if step in (4, 7):
            assert np.allclose(weights[q, : q + 1], maps[0][0, q, : q + 1].numpy(), atol=2e-3), step
            assert np.isfinite(mass[step, : q + 1]).all(), step
        else:
            assert np.isnan(weights[q]).all() and np.isnan(mass[step]).all(), step


def test_histograms_and_moments_match_numpy(recorded, model_dir):
    path, result = recorded
    tr = open_trace(path)
    acts = tr.activations
    site = list(acts.site.values).index("mlp.act.pre")
    tok = ByteTokenizer(bos_id=256, eos_id=None)
    values = {0: [], 5: []}
    for j, prompt in enumerate(["hello world", "abc"]):
        p = tok.encode(prompt)
        seq = p + result.generated[j]
        _, a = _full_forward(model_dir, seq[:-1])
        values[0].append(a[1][: len(p)].numpy())         # step 0: the prompt rows
        values[5].append(a[1][len(p) + 4: len(p) + 5].numpy())  # step 5 feeds generated token 4
    edges = np.asarray(tr.spec.bin_edges)
    for step, parts in values.items():
        x = np.concatenate([v.reshape(-1) for v in parts]).astype(np.float64)
        counts = acts.hist_count.values[step, 1, site, 0]
        assert counts.sum() == x.size == acts.value_count.values[step, 1, site, 0]
        assert np.array_equal(counts, np.histogram(x, bins=edges)[0])
        assert np.isclose(acts.value_sum.values[step, 1, site, 0], x.sum(), rtol=1e-5, atol=1e-6)
        assert np.isclose(acts.value_sumsq.values[step, 1, site, 0], (x ** 2).sum(), rtol=1e-5)
        assert np.isclose(acts.value_sum4.values[step, 1, site, 0], (x ** 4).sum(), rtol=1e-5)
        assert np.isclose(acts.value_max.values[step, 1, site, 0], x.max(), rtol=1e-6)
        mag = np.sort(np.abs(x))
        med = mag[(x.size + 1) // 2 - 1]  # lower median, ARM's convention
        eps = 1.4826 * np.sort(np.abs(mag - med))[(x.size + 1) // 2 - 1] * 0.13
        assert np.isclose(acts.near_zero_eps.values[step, 1, site, 0], eps, rtol=1e-5)
        assert acts.near_zero_count.values[step, 1, site, 0] == (np.abs(x) < eps).sum()


def test_kv_and_timing_are_recorded(recorded):
    tr = open_trace(recorded[0])
    tokens = tr.kv_cache.tokens.values[:, 0, 0]
    assert tokens.tolist() == [12 + 4 + 2 * s for s in range(10)]  # prompts of 12 and 4 tokens, +2 per step
    per_token = 2 * CFG["n_kv_heads"] * (CFG["d_model"] // CFG["n_heads"]) * 4  # K and V, float32, one layer
    assert (tr.kv_cache.bytes_used.values[:, :, 0] == tokens[:, None] * per_token).all()
    blocks = tr.kv_cache.blocks.values[:, 0, 0]
    # 16-token blocks; the padded prefill gave the short prompt 12 positions, so one block each at first
    assert blocks.tolist() == [math.ceil((12 + s) / 16) + math.ceil(max(12, 4 + s) / 16) for s in range(10)]
    assert (tr.kv_cache.bytes_reserved.values[:, :, 0] == blocks[:, None] * 16 * per_token).all()
    secs = tr.timing.seconds.values[1:, :, :, 0]
    parts = list(tr.timing.part.values)
    assert (secs[..., parts.index("attention")] > 0).all() and (secs[..., parts.index("mlp")] > 0).all()
    assert (tr.timing.step_seconds.values[:, 0] > 0).all()


@pytest.mark.slow
def test_tp2_trace_equals_tp1(recorded, model_dir, tmp_path):
    path1, _ = recorded
    spec = RunSpec(model=str(model_dir), prompts=["hello world", "abc"], max_new_tokens=10,
                   record=str(tmp_path / "tp2.zarr"), device="cpu", tp=2)
    run(spec)
    a, b = open_trace(path1), open_trace(tmp_path / "tp2.zarr")
    assert b.status == "complete" and b.spec.world == 2
    assert np.array_equal(a.tokens.token_id.values, b.tokens.token_id.values)
    wa, wb = a.attention.weights.values, b.attention.weights.values
    assert np.allclose(np.nan_to_num(wa), np.nan_to_num(wb), atol=2e-3)
    assert np.array_equal(np.isnan(wa), np.isnan(wb))
    from workbench.compare import attention_change  # what the dashboard's Compare tab shows
    from workbench.trace.token_text import read_token_text
    for seq in (0, 1):
        change = attention_change(a, b, seq)
        assert change.attrs["shared_tokens"] == len(read_token_text(a, seq).ids) and change.shape == wa.shape[1:3]
        assert float(change.max()) <= 2e-3 and np.isfinite(change.values).all()
    sites = list(a.activations.site.values)
    for site in ("mlp.act.pre", "mlp.act.post"):  # column-sharded: counts add over ranks to TP=1's
        s = sites.index(site)
        ha = a.activations.hist_count.values[:, :, s].sum(-2)
        hb = b.activations.hist_count.values[:, :, s].sum(-2)
        assert ha.sum() == hb.sum()
        assert np.abs(ha - hb).sum() <= 4  # a value on a bin edge may round differently
    assert (b.comm.seconds.values[1:] > 0).all()  # every layer, site and rank timed its all-reduce


def _start_generation(model_dir, trace, steps):
    """`workbench generate --record` leading a process group (with its trace worker) of its own."""
    return subprocess.Popen([sys.executable, "-m", "workbench.cli", "generate", "--model", str(model_dir),
                             "--prompt", "live", "--max-new-tokens", str(steps), "--record", str(trace), "--json"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)


def _open_when_created(trace, proc, deadline: float):
    while not (trace / "zarr.json").exists():
        assert proc.poll() is None, f"generation exited ({proc.returncode}) before creating its trace"
        assert time.monotonic() < deadline, "the trace store never appeared"
        time.sleep(0.005)
    return open_trace(trace)  # created at full size beside its path and renamed in: it must open


def _check_consistent(tr):
    """Everything below the commit marker is written, in every group, and nothing partial is visible."""
    n = tr.n_steps
    assert tr.tokens.sizes["step"] == tr.kv_cache.sizes["step"] == tr.activations.sizes["step"] == n
    if n == 0:
        return
    assert (tr.kv_cache.tokens.values[:n, 0, 0] > 0).all()
    assert (tr.activations.value_count.values[:n] > 0).all()
    assert (tr.tokens.chosen.values[0, :n] >= 0).all()
    produced = tr.tokens.produced_step.values[0]
    written = produced[produced >= 0]
    assert written.max() < n
    last_row = np.asarray(tr.attention_map(0, 1, 3, step=n - 1))
    q = tr.queries_upto(0, n - 1)
    assert not np.isnan(last_row[q - 1, :q]).any()


@pytest.mark.slow
def test_reader_process_sees_consistent_prefix_while_generating(model_dir, tmp_path):
    """A reader in another process sees only whole steps, while the run goes on and while it is held.

    Steps are committed in jumps, faster than a fixed schedule could catch on a fast machine; so at
    every new commit the reader sees, the run and its trace worker are held still (SIGSTOP to their
    process group) and the prefix is checked, until three prefixes short of the end were checked.
    """
    trace, steps = tmp_path / "live.zarr", 1000
    proc = _start_generation(model_dir, trace, steps)
    paused: list[int] = []  # committed steps at each pause
    try:
        deadline = time.monotonic() + 180
        tr = _open_when_created(trace, proc, deadline)
        while proc.poll() is None:
            assert time.monotonic() < deadline, f"generation still running after 180 s (paused at {paused})"
            tr.refresh()
            _check_consistent(tr)  # racing the writer
            if len(paused) >= 3 or tr.n_steps == (paused[-1] if paused else 0):
                time.sleep(0.005 if len(paused) < 3 else 0.05)
                continue
            with held(proc.pid):  # a new commit: hold the run and check what the store holds
                tr.refresh()
                if tr.n_steps == steps:
                    break
                _check_consistent(tr)
                fresh = open_trace(trace)
                assert fresh.n_steps == tr.n_steps
                _check_consistent(fresh)
                paused.append(tr.n_steps)
        assert len(paused) >= 3, (f"the run ended or committed its last step after pausing only at steps {paused}: "
                                  f"the model is too fast for this test")
        proc.wait(timeout=120)
    finally:
        end_group(proc)
    assert proc.returncode == 0, proc.stderr.read()
    print(f"live reader: paused at steps {paused} of {steps}")
    tr = open_trace(trace)
    _check_consistent(tr)
    assert tr.status == "complete" and tr.n_steps == steps
    assert paused == sorted(set(paused)) and 0 < paused[0] and paused[-1] < steps, paused  # watched a run in progress


@pytest.mark.slow
def test_sigkill_leaves_committed_prefix_intact(model_dir, tmp_path):
    trace, steps = tmp_path / "killed.zarr", 4000
    proc = _start_generation(model_dir, trace, steps)
    try:
        deadline = time.monotonic() + 120
        tr = _open_when_created(trace, proc, deadline)
        while tr.n_steps < 20:
            assert proc.poll() is None, f"generation exited ({proc.returncode}) before committing 20 steps"
            assert time.monotonic() < deadline, f"only {tr.n_steps} steps committed after 120 s"
            time.sleep(0.01)
            tr.refresh()
        at_kill = kill_leader_while_held(proc, lambda: open_trace(trace).n_steps)
    finally:
        end_group(proc)
    tr = open_trace(trace)
    print(f"killed: {at_kill} steps committed when held, {tr.n_steps} after the worker finished, of {steps}")
    assert tr.status != "complete"
    assert 20 <= at_kill <= tr.n_steps < steps, (at_kill, tr.n_steps)  # what was committed stays committed
    _check_consistent(tr)


def test_user_probe_on_any_hook_point_from_python(model_dir, tmp_path):
    """A user's own probe function rides along a recorded run and sees every step's tensors."""
    seen = []

    def residual_norm(x, hp):
        seen.append((hp.name, hp.layer, tuple(x.shape), float(x.norm())))

    spec = RunSpec(model=str(model_dir), prompts=["hi"], max_new_tokens=4, record=str(tmp_path / "u.zarr"),
                   device="cpu", hooks=[("layers.*.mlp_allreduce.residual", residual_norm)])
    run(spec)
    assert [s[:2] for s in seen] == [("layers.0.mlp_allreduce.residual", 0), ("layers.1.mlp_allreduce.residual", 1)] * 4
    assert seen[0][2] == (1, 3, 32) and seen[2][2] == (1, 1, 32)  # prefill of bos+"hi", then one token a step
    assert open_trace(tmp_path / "u.zarr").status == "complete"


def test_recording_gives_the_writer_a_core_and_gives_it_back(model_dir):
    """Torch runs one thread fewer while recording on CPU, and as before afterwards, also on error."""
    from workbench.probes.recording import a_core_left_for_the_writer

    model = load_llama(model_dir)
    before = torch.get_num_threads()
    with a_core_left_for_the_writer(model):
        assert torch.get_num_threads() == max(1, before - 1)
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError):
        with a_core_left_for_the_writer(model):
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before


def test_a_started_worker_leaves_the_prefill_every_core(model_dir, tmp_path):
    """The writer's worker has nothing to do before the first step ends: once it has started (a
    process that recorded before keeps it), the prefill runs on every core, decode steps on one
    fewer, and the count is given back after."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        def threads_per_step(name):
            seen = []  # torch's threads while each step's forward pass runs
            run(RunSpec(model=str(model_dir), prompts=["hello world"], max_new_tokens=4, record=str(tmp_path / name),
                        device="cpu", hooks=[("layers.0.attn.out", lambda x, hp: seen.append(torch.get_num_threads()))]))
            assert torch.get_num_threads() == 2
            return seen

        threads_per_step("first.zarr")  # its worker may still be importing at the prefill
        assert threads_per_step("second.zarr") == [2, 1, 1, 1]
    finally:
        torch.set_num_threads(before)


def test_the_prefill_is_reduced_by_the_worker_and_equals_the_generating_threads_reduction(model_dir, tmp_path,
                                                                                          monkeypatch):
    """A normal prefill ships its rows to the writer's worker; one above the cap is reduced in place."""
    from workbench.probes import recorder as rec_module
    from workbench.probes.recorder import Recorder
    calls = []
    real = rec_module.batched_stats
    monkeypatch.setattr(rec_module, "batched_stats", lambda *a, **k: calls.append(1) or real(*a, **k))
    spec = dict(model=str(model_dir), prompts=["hello world", "abc"], max_new_tokens=3, device="cpu",
                probes=ProbeSelection.parse("activations"))
    run(RunSpec(**spec, record=str(tmp_path / "shipped.zarr")))
    assert calls == []  # nothing reduced on the generating thread
    monkeypatch.setattr(Recorder, "max_shipped_prefill_values", 1)
    run(RunSpec(**spec, record=str(tmp_path / "in_place.zarr")))
    assert len(calls) == 1  # the prefill, in place
    a, b = (open_trace(tmp_path / f"{n}.zarr").activations.isel(step=0) for n in ("shipped", "in_place"))
    for name in ("hist_count", "value_count", "near_zero_count"):
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
    for name in ("value_sum", "value_sumsq", "value_sum3", "value_sum4", "value_min", "value_max", "near_zero_eps"):
        np.testing.assert_allclose(a[name].values, b[name].values, rtol=1e-9, atol=1e-12, err_msg=name)
