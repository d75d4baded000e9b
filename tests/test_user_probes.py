"""Your own probes recorded into the trace: values per step, hook point and rank, TP=2 = TP=1, bad input."""
import numpy as np
import pytest
import torch
import xarray as xr

from workbench.errors import WorkbenchError
from workbench.models.config import LlamaConfig
from workbench.models.llama import Llama
from workbench.models.perceiver import PerceiverAR, PerceiverConfig
from workbench.probes.recorder import Recorder
from workbench.probes.user_probe import UserProbe, UserValues
from workbench.runtime.checkpoint import load_llama, save_llama
from workbench.runtime.generate import generate
from workbench.runtime.perceiver_checkpoint import save_perceiver
from workbench.runtime.session import RunSpec, run
from workbench.runtime.tokenizer import ByteTokenizer
from workbench.trace.reader import open_trace
from workbench.trace.schema import TraceSpec, UserArraySpec

CFG = dict(vocab_size=259, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=256,
           bos_id=256, eos_id=None)
PROMPTS = ["hello world", "abc"]
STEPS = 30
RESID = "layers.*.mlp_allreduce.residual"


# Module-level probe functions: tensor-parallel ranks unpickle them in their own processes.
def last_rms(x, hp):
    """RMS of the last position of each sequence"""
    return x[:, -1].double().pow(2).mean(-1).sqrt()


def positive_count(x, hp):
    return int((x > 0).sum())


def top_token(logits, hp):
    return logits[:, -1].argmax(-1)


def first_three(x, hp):
    return x[0, -1, :3]


def sum_of_squares(x, hp):
    return float(x.double().pow(2).sum())


def grows_a_dim(x, hp):
    """Right shape for the prefill and five decode steps, then (layer 1, step 6) one value too many."""
    n = 2 if x.shape[1] == 1 and hp.name.startswith("layers.1") and _steps_seen(hp) > 5 else 1
    return np.zeros(n)


_SEEN: dict = {}


def _steps_seen(hp) -> int:
    _SEEN[hp.name] = _SEEN.get(hp.name, 0) + 1
    return _SEEN[hp.name]


PROBES = [
    UserProbe("resid_rms", RESID, last_rms, dims=("seq",), dtype="float64"),
    UserProbe("act_positive", "layers.*.mlp.act.pre", positive_count, dtype="int64"),
    UserProbe("top_token", "logits", top_token, dims=("seq",), dtype="int64"),
    UserProbe("first_three", RESID, first_three, dims=("width",), shape=(3,)),
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("user_probe_model")
    save_llama(Llama(LlamaConfig(**CFG)), path, ByteTokenizer(bos_id=256, eos_id=None))
    return path


@pytest.fixture(scope="module")
def recorded(model_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("user_traces") / "u.zarr"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Recorder, "max_batch_steps", 7)  # several decode batches, the last one short
        result = run(RunSpec(model=str(model_dir), prompts=PROMPTS, max_new_tokens=STEPS, record=str(path),
                             device="cpu", user_probes=PROBES))
    return path, result


def _reference(model_dir):
    """The same generation without recording, its tensors kept by plain listeners."""
    model = load_llama(model_dir)
    tok = ByteTokenizer(bos_id=256, eos_id=None)
    resid, act = {}, {}
    step = []

    def keep(store):
        return lambda x, hp: store.setdefault(len(step), {}).__setitem__(hp.layer, x.clone())

    with model.listening(RESID, keep(resid)), model.listening("layers.*.mlp.act.pre", keep(act)):
        generate(model, [tok.encode(p) for p in PROMPTS], STEPS, on_step=lambda ev: step.append(ev.step))
    return resid, act


def test_user_probe_values_equal_the_tensors_they_reduce(recorded, model_dir):
    path, result = recorded
    tr = open_trace(path)
    assert tr.status == "complete" and tr.n_steps == STEPS
    user = tr.user
    assert set(user.data_vars) == {"resid_rms", "act_positive", "top_token", "first_three"}
    assert user["resid_rms"].dims == ("step", "resid_rms_hook", "rank", "seq")
    assert list(user["resid_rms_hook"].values) == ["layers.0.mlp_allreduce.residual", "layers.1.mlp_allreduce.residual"]
    assert user["resid_rms"].attrs["description"] == "RMS of the last position of each sequence"
    resid, act = _reference(model_dir)
    rms = user["resid_rms"].isel(rank=0).values  # [step, hook, seq]
    pos = user["act_positive"].isel(rank=0).values  # [step, hook]
    for s in range(STEPS):
        for layer in range(2):
            x = resid[s][layer][:, -1].double().numpy()
            np.testing.assert_allclose(rms[s, layer], np.sqrt((x ** 2).mean(-1)), rtol=1e-5)  # one torch thread fewer
            assert pos[s, layer] == int((act[s][layer] > 0).sum())
            np.testing.assert_allclose(user["first_three"].values[s, layer, 0], resid[s][layer][0, -1, :3], rtol=1e-5)
    # The logits' argmax is what the greedy sampler chose: an independent record of the same thing.
    top = user["top_token"].isel(rank=0, top_token_hook=0).values  # [step, seq]
    np.testing.assert_array_equal(top, tr.tokens["chosen"].values.T)
    np.testing.assert_array_equal(top.T, np.array(result.generated))


def test_user_group_opens_with_plain_xarray(recorded):
    path, _ = recorded
    ds = xr.open_zarr(path, group="user", consolidated=False)
    assert ds["act_positive"].dims == ("step", "act_positive_hook", "rank")
    assert ds["act_positive"].dtype == np.int64 and int(ds["act_positive"].min()) >= 0
    assert list(ds["top_token_hook"].values) == ["logits"]
    assert ds.sizes["step"] == STEPS and ds.sizes["seq"] == len(PROMPTS)


def test_tp2_user_probe_values_sum_to_tp1(model_dir, tmp_path):
    """Each rank records what it sees: its columns' sum of squares adds up to the whole layer's."""
    probe = UserProbe("act_sq", "layers.*.mlp.act.pre", sum_of_squares, dtype="float64")
    traces = {}
    for tp in (1, 2):
        path = tmp_path / f"tp{tp}.zarr"
        run(RunSpec(model=str(model_dir), prompts=PROMPTS, max_new_tokens=12, record=str(path), device="cpu",
                    tp=tp, user_probes=[probe]))
        traces[tp] = open_trace(path).user["act_sq"].values  # [step, hook, rank]
    assert traces[2].shape == (12, 2, 2) and not np.isnan(traces[2]).any()
    assert (traces[2] > 0).all()  # both ranks wrote their own region
    np.testing.assert_allclose(traces[2].sum(axis=2), traces[1][:, :, 0], rtol=1e-5)


def test_user_probe_on_perceiver_ar(tmp_path):
    torch.manual_seed(0)
    cfg = dict(d_model=32, n_latents=6, n_heads=4, n_kv_heads=2, n_self_layers=1, n_repeats=2, d_ff=64,
               max_seq_len=64, eos_id=None)
    save_perceiver(PerceiverAR(PerceiverConfig(**cfg)), tmp_path / "m")
    probe = UserProbe("logit_top", "logits", top_token, dims=("seq",), dtype="int64")
    result = run(RunSpec(model=str(tmp_path / "m"), prompts=PROMPTS, max_new_tokens=8,
                         record=str(tmp_path / "p.zarr"), device="cpu", user_probes=[probe]))
    top = open_trace(tmp_path / "p.zarr").user["logit_top"].values[:, 0, 0]  # [step, seq]
    np.testing.assert_array_equal(top.T, np.array(result.generated))


@pytest.mark.parametrize("probe, message", [
    (UserProbe("bad name", RESID, last_rms), "is not a Python identifier"),
    (UserProbe("p", "layers.*.nothing_here", last_rms), "no hook point matches"),
    (UserProbe("p", RESID, last_rms, dims=("width",)), "dim 'width' needs a size"),
    (UserProbe("p", RESID, last_rms, dims=("seq",), shape=(2, 3)), "has 2 sizes for 1 dims"),
    (UserProbe("p", RESID, last_rms, dims=("seq",), shape=(5,)), "the run has 2 sequences"),
    (UserProbe("p", RESID, last_rms, dims=("step",), shape=(3,)), "is the trace's own"),
    (UserProbe("p", RESID, last_rms, dtype="float16"), "dtype 'float16' is not one of"),
    (UserProbe("p", RESID, "not a function"), "fn is not callable"),
])
def test_bad_user_probes_are_refused_before_the_trace_exists(model_dir, tmp_path, probe, message):
    with pytest.raises(WorkbenchError, match=message) as err:
        run(RunSpec(model=str(model_dir), prompts=PROMPTS, max_new_tokens=3, record=str(tmp_path / "t.zarr"),
                    device="cpu", user_probes=[probe]))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "t.zarr").exists()


def test_probes_may_not_share_a_name_size_a_dim_differently_or_name_a_dim(model_dir, tmp_path):
    spec = dict(model=str(model_dir), prompts=PROMPTS, max_new_tokens=3, record=str(tmp_path / "t.zarr"),
                device="cpu")
    twice = UserProbe("p", RESID, last_rms, dims=("seq",))
    with pytest.raises(WorkbenchError, match="two user probes are named 'p'"):
        run(RunSpec(**spec, user_probes=[twice, twice]))
    a = UserProbe("a", RESID, last_rms, dims=("width",), shape=(3,))
    b = UserProbe("b", RESID, last_rms, dims=("width",), shape=(4,))
    with pytest.raises(WorkbenchError, match="give dim 'width' different sizes"):
        run(RunSpec(**spec, user_probes=[a, b]))
    with pytest.raises(WorkbenchError, match="user probe 'width': its name is also a dim of group user"):
        run(RunSpec(**spec, user_probes=[a, UserProbe("width", RESID, last_rms)]))
    with pytest.raises(WorkbenchError, match="user probe 'b': dim 'a_hook' is the trace's own"):
        run(RunSpec(**spec, user_probes=[a, UserProbe("b", RESID, last_rms, dims=("a_hook",), shape=(2,))]))
    assert not (tmp_path / "t.zarr").exists()


def test_a_probe_returning_the_wrong_shape_fails_the_run_and_keeps_committed_steps(model_dir, tmp_path):
    _SEEN.clear()
    probe = UserProbe("grows", "layers.*.mlp.act.pre", grows_a_dim, dims=("one",), shape=(1,))
    path = tmp_path / "f.zarr"
    with pytest.raises(WorkbenchError, match=r"user probe 'grows' at layers\.1\.mlp\.act\.pre: fn returned "
                                             r"shape \(2,\), declared \(1,\)"):
        run(RunSpec(model=str(model_dir), prompts=PROMPTS, max_new_tokens=20, record=str(path), device="cpu",
                    user_probes=[probe]))
    tr = open_trace(path)
    assert tr.status == "failed" and "user probe 'grows'" in tr.error
    assert tr.n_steps == 6  # steps 0-5 committed; step 6, where fn failed, never ended
    values = tr.user["grows"].values
    assert (values[:, :, 0, 0] == 0).all()  # every committed step holds what fn returned


def test_a_probe_that_raises_fails_the_run_with_a_one_line_error_naming_it(model_dir, tmp_path):
    import subprocess
    import sys
    (tmp_path / "bad.py").write_text("from workbench import UserProbe\n"
                                     "def f(x, hp):\n    return 1 / 0\n"
                                     "probes = UserProbe('boom', 'logits', f)\n")
    out = subprocess.run([sys.executable, "-m", "workbench.cli", "generate", "--model", str(model_dir), "--prompt",
                          "hi", "--max-new-tokens", "4", "--record", str(tmp_path / "b.zarr"),
                          "--user-probe", f"{tmp_path / 'bad.py'}:probes"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out
    assert out.stderr.strip().splitlines() == ["workbench: error: user probe 'boom' at logits raised "
                                               "ZeroDivisionError: division by zero"], out.stderr
    tr = open_trace(tmp_path / "b.zarr")
    assert tr.status == "failed" and "ZeroDivisionError" in tr.error


def test_user_arrays_round_trip_through_the_spec_and_must_be_in_the_store(tmp_path):
    from workbench.trace.reader import TraceError
    from workbench.trace.writer import create_store
    import shutil
    u = UserArraySpec(name="x", hooks=("a", "b"), dims=("seq", "w"), shape=(2, 3), dtype="int64", fn="m.f")
    spec = TraceSpec(n_seq=2, max_steps=4, max_positions=8, n_layers=1, n_heads=1, user_arrays=(u,))
    assert TraceSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="dim 'seq' has size 2, but the run has 3 sequences"):
        TraceSpec(n_seq=3, max_steps=4, max_positions=8, n_layers=1, n_heads=1, user_arrays=(u,))
    create_store(tmp_path / "s.zarr", spec)
    tr = open_trace(tmp_path / "s.zarr")
    assert tr.user["x"].shape == (0, 2, 1, 2, 3) and tr.user.sizes["w"] == 3
    shutil.rmtree(tmp_path / "s.zarr" / "user" / "x")
    with pytest.raises(TraceError, match="missing array 'user/x'"):
        open_trace(tmp_path / "s.zarr")


def silence_mlp(y, hp):
    return torch.zeros_like(y)


def test_replay_warns_that_hooks_were_not_replayed_and_user_probes_change_nothing(recorded, model_dir, tmp_path):
    import subprocess
    import sys
    path, _ = recorded
    out = subprocess.run([sys.executable, "-m", "workbench.cli", "replay", str(path), "--verify"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "identical tokens" in out.stdout and "warning" not in out.stderr, out
    hooked = tmp_path / "hooked.zarr"
    run(RunSpec(model=str(model_dir), prompts=PROMPTS, max_new_tokens=STEPS, record=str(hooked), device="cpu",
                hooks=[("layers.1.mlp.out", silence_mlp)]))
    assert open_trace(hooked).metadata["hooks"] == [{"pattern": "layers.1.mlp.out",
                                                     "fn": "test_user_probes.silence_mlp"}]
    out = subprocess.run([sys.executable, "-m", "workbench.cli", "replay", str(hooked), "--verify"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "differs at step" in out.stdout, out
    assert out.stderr.strip() == ("warning: the recorded run had hooks that may have changed its computation "
                                  "(test_user_probes.silence_mlp on layers.1.mlp.out); the replay ran without them")


def test_your_probes_tab_shows_the_recorded_values(recorded, model_dir, tmp_path):
    from workbench.views.dashboard import Dashboard
    from workbench.views.user_probes import probe_values
    path, _ = recorded
    dash = Dashboard(path)
    st = dash.state
    assert dash._tab_views == ["attention", "heads", "kv_cache", "activations", "timing", "comm", "user", "run"]
    dash.tabs.active = dash._tab_views.index("user")
    view = dash.views["user"]
    assert list(view.probe.options) == ["resid_rms", "act_positive", "top_token", "first_three"]
    assert view.probe.value == "resid_rms"
    tr = open_trace(path)
    st.seq = 1
    lines = view.line_source.data
    assert lines["step"] == list(range(STEPS))
    want = tr.user["resid_rms"].values[:, :, 0, 1]  # [step, hook] of sequence 1, one rank
    np.testing.assert_allclose(np.array([lines["h0"], lines["h1"]]).T, want, rtol=1e-6)
    st.select_step(7)
    assert view.cursor.location == 7 and "at step 7" in view.at_step.title.text
    bars = view.step_source.data
    assert bars["index"] == [0, 1] and bars["hook"] == list(tr.user["resid_rms_hook"].values)
    np.testing.assert_allclose(bars["value"], want[7], rtol=1e-6)
    assert view.at_step.xaxis.major_label_overrides == {0: "0", 1: "1"}  # what tells the hook points apart
    view.probe.value = "act_positive"  # no seq dim, int64: counts per hook point
    np.testing.assert_array_equal(np.array([view.line_source.data["h0"], view.line_source.data["h1"]]).T,
                                  tr.user["act_positive"].values[:, :, 0])
    view.combine.value = "sum"
    np.testing.assert_array_equal(probe_values(tr, "act_positive", 0, 0, STEPS, "sum")[:, :, 0],
                                  tr.user["act_positive"].values[:, :, 0])
    view.probe.value = "first_three"  # three values per hook point: a line each over `width` at the step
    three = tr.user["first_three"].values[:, :, 0]  # [step, hook, width]
    assert view.step_source.data["index"] == [0, 1, 2] and view.at_step.xaxis.axis_label == "width"
    np.testing.assert_allclose(view.step_source.data["h1"], three[7, 1], rtol=1e-6)
    np.testing.assert_allclose(view.line_source.data["h0"], three[:, 0].mean(axis=1), rtol=1e-5)
    assert "mean over width" in view.lines.title.text
    assert not view._note.visible and not dash.error.visible
    plain = tmp_path / "plain.zarr"
    run(RunSpec(model=str(model_dir), prompts=["x"], max_new_tokens=2, record=str(plain), device="cpu"))
    assert "user" not in Dashboard(plain)._tab_views


def test_notebook_widget_shows_your_probes_only_when_the_run_had_some(recorded, synthetic_path):
    from workbench.notebook import TraceWidget
    path, _ = recorded
    widget = TraceWidget(path)
    assert "user" in widget.views and widget.views["user"].probe.value == "resid_rms"
    assert "user" not in TraceWidget(synthetic_path).views


@pytest.fixture(scope="module")
def synthetic_path(tmp_path_factory):
    from workbench.trace.synthetic import write_synthetic_trace
    path = tmp_path_factory.mktemp("synthetic") / "s.zarr"
    write_synthetic_trace(path, n_steps=4, n_layers=2, n_heads=2)
    return path


PROBE_FILE = '''
import torch
from workbench import UserProbe


def mean_abs(x, hp):
    """Mean |activation| of the step's tokens"""
    return float(x.abs().mean())


probes = [UserProbe("mean_abs", "layers.*.mlp.act.pre", mean_abs)]
'''


def test_cli_records_user_probes_from_a_file_and_refuses_bad_references(model_dir, tmp_path):
    import subprocess
    import sys
    (tmp_path / "myprobes.py").write_text(PROBE_FILE)
    base = [sys.executable, "-m", "workbench.cli", "generate", "--model", str(model_dir), "--prompt", "hi",
            "--max-new-tokens", "6"]
    out = subprocess.run([*base, "--tp", "2", "--record", str(tmp_path / "c.zarr"),
                          "--user-probe", f"{tmp_path / 'myprobes.py'}:probes"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    values = open_trace(tmp_path / "c.zarr").user["mean_abs"]
    assert values.dims == ("step", "mean_abs_hook", "rank") and values.shape == (6, 2, 2)
    assert (values.values > 0).all()  # both ranks, every step and layer
    for ref, message in [("nope_module:probes", "cannot import nope_module: ModuleNotFoundError"),
                         (f"{tmp_path / 'myprobes.py'}:missing", "module myprobes has no 'missing'"),
                         (f"{tmp_path / 'myprobes.py'}:mean_abs", "mean_abs is not a UserProbe or a list of them"),
                         ("no-colon", "expected MODULE:NAME or FILE.py:NAME")]:
        out = subprocess.run([*base, "--record", str(tmp_path / "bad.zarr"), "--user-probe", ref],
                             capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out
        assert not (tmp_path / "bad.zarr").exists()
    out = subprocess.run([*base, "--user-probe", "myprobes:probes"], capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert out.returncode == 2 and "--user-probe records into a trace: add --record TRACE" in out.stderr


def test_tensor_values_are_kept_as_copies_and_moved_to_the_host_per_batch():
    """A returned tensor is kept as a detached copy (not a view that pins the activation or sees it
    change), in its own dtype, until the batch's values go to the host together, cast to the
    declared dtype, with the fill where a hook point did not fire."""
    from types import SimpleNamespace
    spec = UserArraySpec(name="v", hooks=("a", "b"), dims=("w",), shape=(3,), dtype="float32", fn="t")
    values = UserValues(spec, lambda x, hp: x[0, :3] if hp.name == "a" else x[1, :3].bfloat16())
    x = torch.arange(12.0).reshape(2, 6)
    values.listener(0)(x, SimpleNamespace(name="a"))
    first = values.take()
    assert isinstance(first[0], torch.Tensor) and first[0]._base is None and first[1] is None
    x += 100  # the model's next step: what was kept does not change
    values.listener(1)(x, SimpleNamespace(name="b"))
    third = values.take()
    assert third[1].dtype == torch.bfloat16 and values.take() is None
    out = values.to_array([first, None, third])
    assert out.shape == (3, 2, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out[0, 0], [0, 1, 2])
    np.testing.assert_array_equal(out[2, 1], [106, 107, 108])
    assert np.isnan(out[0, 1]).all() and np.isnan(out[1]).all() and np.isnan(out[2, 0]).all()
    ints = UserValues(UserArraySpec(name="n", hooks=("a",), dims=(), shape=(), dtype="int64", fn="t"),
                      lambda x, hp: x.sum())
    with pytest.raises(WorkbenchError, match=r"user probe 'n' at a: fn returned float32 values, declared int64"):
        ints.listener(0)(x, SimpleNamespace(name="a"))
