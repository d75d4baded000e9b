"""ARM (workbench/models/arm.py) against a NumPy reference, on a model, from the CLI, and under TP."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from workbench.errors import WorkbenchError
from workbench.models.arm import (ARM, ARMConfig, apply_arm, lower_median, mad_threshold, near_zero_fraction,
                                  percentile)
from workbench.models.config import LlamaConfig
from workbench.models.llama import Llama


def _silu_acts(shape=(2, 3, 704), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.silu(torch.randn(shape, generator=g) * 2)


def _numpy_arm(a: np.ndarray, cfg: ARMConfig, seed: int) -> tuple[np.ndarray, dict]:
    """Independent reference: numpy statistics, stable argsort selection, the module's uniforms."""
    flat = a.reshape(-1).astype(np.float64)
    mag = np.abs(flat)
    lower = lambda x: np.sort(x)[(x.size - 1) // 2]  # noqa: E731  lower median, as torch.median
    med = lower(mag)
    eps = 1.4826 * lower(np.abs(mag - med)) * cfg.c
    s = np.mean(mag < eps)
    frac = min(max(cfg.k * s, cfg.clip_lo), cfg.clip_hi)
    n = int(round(frac * flat.size))
    idx = np.sort(np.argsort(mag, kind="stable")[:n])
    u = torch.rand(flat.size, generator=torch.Generator().manual_seed(seed)).double().numpy()[idx]
    pos_scale = np.percentile(flat, cfg.percentile)
    neg_scale = max(-flat.min(), 0.0)
    out = flat.copy()
    out[idx] = np.where(flat[idx] < 0, -u * neg_scale, u * pos_scale)
    return out.reshape(a.shape), dict(eps=eps, s=s, frac=frac, n=n, idx=idx)


# --- definitions ------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 7, 1000, 1001])
def test_median_and_percentile_conventions(n):
    x = torch.randn(n)
    assert float(lower_median(x)) == float(torch.median(x))  # lower median
    xs = np.sort(x.numpy())
    assert float(lower_median(x)) == xs[(n - 1) // 2]
    for q in (0, 50, 99.5, 100):
        assert float(percentile(x, q)) == pytest.approx(np.percentile(x.numpy().astype(np.float64), q), rel=1e-6, abs=1e-6)
        assert float(percentile(x, q)) == pytest.approx(float(torch.quantile(x, q / 100)), rel=1e-6, abs=1e-6)


def test_percentile_beyond_torch_quantile_size_limit():
    x = torch.arange(17_000_000, dtype=torch.float32)  # torch.quantile refuses > 16M elements
    assert float(percentile(x, 99.5)) == pytest.approx(np.percentile(np.arange(17_000_000.0), 99.5), rel=1e-6)


# --- the transformation -----------------------------------------------------------------------
def test_matches_numpy_reference_and_keeps_shape_and_signs():
    a = _silu_acts()
    cfg = ARMConfig()
    arm = ARM(cfg, layer=0, seed=5, d_ff=a.shape[-1])
    out = arm(a)
    ref, r = _numpy_arm(a.numpy(), cfg, seed=5)
    assert out.shape == a.shape and out.dtype == a.dtype
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-6)
    st = arm.stats
    assert st.eps == pytest.approx(r["eps"], rel=1e-5)
    assert st.near_zero_before == pytest.approx(r["s"])
    assert st.frac == pytest.approx(r["frac"]) and st.n_replaced == r["n"]
    # Signs kept (zero counts as positive), exactly n entries changed, all others untouched.
    assert torch.equal(out >= 0, a >= 0)
    changed = (out != a).reshape(-1)
    assert int(changed.sum()) == st.n_replaced == round(st.frac * a.numel())
    assert np.array_equal(np.flatnonzero(changed.numpy()), r["idx"])
    # The replaced entries were the smallest in magnitude.
    mag = a.abs().reshape(-1)
    assert mag[changed].max() <= mag[~changed].min()
    # The near-zero fraction falls, and the stats agree with the public helpers.
    assert st.near_zero_after < st.near_zero_before
    assert st.eps == pytest.approx(mad_threshold(a, cfg.c), rel=1e-6)
    assert st.near_zero_before == near_zero_fraction(a, st.eps)
    assert st.near_zero_after == near_zero_fraction(out, st.eps)


def test_fraction_clipped_and_scaled_by_k():
    a = _silu_acts()
    lo = ARM(ARMConfig(k=0.0), 0, 0, a.shape[-1])
    lo(a)
    assert lo.stats.frac == 0.2
    hi = ARM(ARMConfig(k=1000.0), 0, 0, a.shape[-1])
    hi(a)
    assert hi.stats.frac == 0.25 and hi.stats.n_replaced == round(0.25 * a.numel())
    mid = ARM(ARMConfig(k=1000.0, clip_lo=0.0, clip_hi=1.0), 0, 0, a.shape[-1])
    mid(a)
    assert mid.stats.frac == pytest.approx(min(1.0, 1000 * mid.stats.near_zero_before))


def test_same_seed_same_output_and_reset():
    a = _silu_acts()
    m1, m2, m3 = (ARM(ARMConfig(), 0, s, a.shape[-1]) for s in (3, 3, 4))
    o1, o2, o3 = m1(a), m2(a), m3(a)
    assert torch.equal(o1, o2)
    assert not torch.equal(o1, o3)
    second = m1(a)
    assert not torch.equal(second, o1)  # the generator advances between calls
    m1.reset()
    assert torch.equal(m1(a), o1)
    # The layer index is part of the seed.
    assert not torch.equal(ARM(ARMConfig(), 1, 3, a.shape[-1])(a), o1)


def test_no_negative_values():
    a = torch.rand(4, 1, 256) * 3  # all >= 0: nothing negative may be drawn
    a[0, 0, :10] = 0.0
    arm = ARM(ARMConfig(), 0, 0, 256)
    out = arm(a)
    assert torch.isfinite(out).all() and (out >= 0).all()
    assert arm.stats.n_negative == 0 and arm.stats.neg_scale == 0.0
    assert int((out != a).sum()) == arm.stats.n_replaced
    ref, _ = _numpy_arm(a.numpy(), arm.cfg, seed=0)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-5, atol=1e-6)


def test_empty_tensor_passes_through():
    a = torch.zeros(1, 0, 16)
    assert ARM(ARMConfig(), 0, 0, 16)(a).shape == (1, 0, 16)


def test_ties_at_the_cut_go_to_lower_indices():
    a = torch.tensor([0.5, 0.0, 0.0, 0.0, 0.0, 2.0, -1.0, 3.0]).view(1, 1, 8)
    arm = ARM(ARMConfig(clip_lo=0.25, clip_hi=0.25), 0, 0, 8)  # n = 2 of four equal zeros
    out = arm(a).view(-1)
    changed = (out != a.view(-1)).nonzero().view(-1).tolist()
    assert arm.stats.n_replaced == 2 and changed == [1, 2]


def test_half_precision_keeps_dtype():
    a = _silu_acts().to(torch.bfloat16)
    out = ARM(ARMConfig(), 0, 0, a.shape[-1])(a)
    assert out.dtype == torch.bfloat16 and torch.equal(out >= 0, a >= 0)


def test_bad_settings_are_one_line_errors():
    for kw, word in [(dict(c=0), "c"), (dict(k=-1), "k"), (dict(clip_lo=0.3, clip_hi=0.2), "clip"),
                     (dict(percentile=101), "percentile"), (dict(layers=()), "layer")]:
        with pytest.raises(WorkbenchError, match=word):
            ARMConfig(**kw)
    with pytest.raises(WorkbenchError, match="unknown ARM setting 'cc'"):
        ARMConfig.from_dict({"cc": 1})


# --- on a model -------------------------------------------------------------------------------
def _tiny(n_layers=2):
    torch.manual_seed(0)
    return Llama(LlamaConfig(vocab_size=260, d_model=64, n_layers=n_layers, n_heads=4, n_kv_heads=2, d_ff=128,
                             max_seq_len=128)).eval()


def test_apply_arm_installs_first_layer_by_default_and_redistributes():
    model = _tiny()
    installed = apply_arm(model, ARMConfig(), seed=7)
    assert [m.layer for m in installed] == [0]
    assert model.layers[0].mlp.redistribute is installed[0] and model.layers[1].mlp.redistribute is None
    assert installed[0].seed == 7
    seen = {}
    keep = lambda x, hp: seen.__setitem__(hp.name, x.clone())  # noqa: E731
    with model.listening("layers.*.mlp.act.*", keep), torch.no_grad():
        model(torch.randint(0, 256, (2, 9)))
    pre, post = seen["layers.0.mlp.act.pre"], seen["layers.0.mlp.act.post"]
    st = installed[0].stats
    assert int((pre != post).sum()) == st.n_replaced == round(st.frac * pre.numel())
    assert near_zero_fraction(post, st.eps) < near_zero_fraction(pre, st.eps)
    assert torch.equal(seen["layers.1.mlp.act.pre"], seen["layers.1.mlp.act.post"])
    assert apply_arm(_tiny(), None) == []
    with pytest.raises(WorkbenchError, match="ARM layer 5 does not exist: the model has 2 layers"):
        apply_arm(_tiny(), {"layers": [5]})


def test_sharded_width_without_shard_is_an_error():
    arm = ARM(ARMConfig(), 0, 0, d_ff=128)
    with pytest.raises(RuntimeError, match="width 64 with 1 rank"):
        arm(torch.randn(1, 1, 64))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from workbench.runtime.checkpoint import save_llama
    from workbench.runtime.tokenizer import ByteTokenizer
    path = tmp_path_factory.mktemp("tiny_llama")
    save_llama(_tiny(), path, tokenizer=ByteTokenizer(260, 256, 257))
    return path


def test_session_run_with_arm_is_seeded(tiny_dir):
    from workbench.runtime.sampler import SamplerConfig
    from workbench.runtime.session import RunSpec, run_local

    def probs(arm, seed=0):
        seen = []
        spec = RunSpec(model=str(tiny_dir), prompts=["a" + "/" * 20], max_new_tokens=4, device="cpu", arm=arm,
                       sampler=SamplerConfig(temperature=1.0, seed=seed))
        result = run_local(spec, on_step=lambda ev: seen.append(ev.cand_probs.clone()))
        return result.generated, torch.stack(seen)

    on = {"layers": [0, 1]}
    (t1, p1), (t2, p2) = probs(on), probs(on)
    assert t1 == t2 and torch.equal(p1, p2)  # same seed, same run
    _, p_other_seed = probs({"layers": [0, 1], "seed": 123})
    _, p_off = probs(None)
    assert not torch.equal(p1[0], p_off[0]) and not torch.equal(p1[0], p_other_seed[0])


def test_cli_flags(tiny_dir, capsys):
    from workbench.cli import _spec_from_args, build_parser, main
    args = build_parser().parse_args(["generate", "--arm", "--arm-layers", "0,1", "--arm-c", "0.2", "--arm-k", "2"])
    arm = _spec_from_args(args).arm
    assert arm == dict(ARMConfig(layers=(0, 1), c=0.2, k=2.0).to_dict())
    assert _spec_from_args(build_parser().parse_args(["generate"])).arm is None
    assert main(["generate", "--model", str(tiny_dir), "--prompt", "hi", "--max-new-tokens", "3", "--json",
                 "--arm", "--arm-layers", "0,1"]) == 0
    assert len(json.loads(capsys.readouterr().out)["generated_ids"][0]) == 3
    for argv, msg in [(["--arm", "--arm-layers", "7"], "ARM layer 7 does not exist"),
                      (["--arm", "--arm-c", "0"], "ARM c must be > 0"),
                      (["--arm-k", "2"], "--arm-k needs --arm"),
                      (["--arm", "--arm-layers", "x"], "comma-separated layer numbers")]:
        try:
            code = main(["generate", "--model", str(tiny_dir), "--prompt", "hi", "--max-new-tokens", "2", "--json",
                         *argv])
        except SystemExit as e:  # argparse rejects the flag itself
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and msg in err and err.count("\n") == 1, err


# --- tensor parallelism: real gloo processes --------------------------------------------------
def _tp_worker(rank: int, world: int, init: str, out_dir: str) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        full = _silu_acts((2, 3, 704), seed=11)
        w = full.shape[-1] // world
        arm = ARM(ARMConfig(), layer=0, seed=9, d_ff=full.shape[-1])
        arm.shard = (rank, world)
        outs = [arm(full[..., rank * w:(rank + 1) * w]) for _ in range(2)]  # two calls: generator stays in step
        torch.save({"outs": outs, "stats": arm.stats.to_dict(), "bytes": arm.gathered_bytes},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_tp2_equals_tp1_with_real_gloo_processes(tmp_path):
    import torch.multiprocessing as mp
    world = 2
    mp.spawn(_tp_worker, args=(world, f"file://{tmp_path}/rdzv", str(tmp_path)), nprocs=world, join=True)
    full = _silu_acts((2, 3, 704), seed=11)
    ref = ARM(ARMConfig(), layer=0, seed=9, d_ff=704)
    ref_outs = [ref(full) for _ in range(2)]
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for call in range(2):
        got = torch.cat([p["outs"][call] for p in parts], dim=-1)
        assert torch.equal(got, ref_outs[call]), f"call {call}"
    for p in parts:
        assert p["stats"] == ref.stats.to_dict()
        assert p["bytes"] == full.numel() * 4  # the all-gather receives the whole tensor


@pytest.mark.slow
def test_model_tp2_with_arm_equals_tp1(tiny_dir):
    """Whole model: ARM on layers 0 and 1 under TP=2 (spawned gloo ranks) gives TP=1's run."""
    from workbench.runtime.session import RunSpec, run, run_local

    def probs(tp, arm):
        seen = []
        spec = RunSpec(model=str(tiny_dir), prompts=["a" + "/" * 20], max_new_tokens=4, device="cpu", arm=arm,
                       tp=tp)
        result = (run if tp > 1 else run_local)(spec, on_step=lambda ev: seen.append(ev.cand_probs.clone()))
        return result.generated, torch.stack(seen)

    on = {"layers": [0, 1]}
    t1, p1 = probs(1, on)
    t2, p2 = probs(2, on)
    _, p_off = probs(1, None)
    assert t1 == t2
    gap = float((p1 - p2).abs().max())
    assert gap < 1e-5
    assert float((p1 - p_off).abs().max()) > 100 * gap + 1e-6  # ARM's effect dwarfs the TP rounding


def test_recorded_run_shows_mass_moved_away_from_zero(tiny_dir, tmp_path):
    """A trace of a run with ARM on: layer 0's act.pre histogram peaks next to zero, act.post has
    that mass moved outwards; both equal an independent recomputation on the trace's edges."""
    from workbench.probes.selection import ProbeSelection
    from workbench.runtime.checkpoint import load_llama
    from workbench.runtime.session import RunSpec, run
    from workbench.trace import open_trace
    path = tmp_path / "arm.zarr"
    run(RunSpec(model=str(tiny_dir), prompts=["def f(x):\n    return x"], max_new_tokens=2, device="cpu",
                arm={"layers": [0]}, record=str(path), probes=ProbeSelection.parse("activations")))
    tr = open_trace(path)
    assert tr.metadata["arm"] == {"layers": [0]}
    edges = np.asarray(tr.spec.bin_edges)
    hist = tr.activations["hist_count"].isel(step=0).sum("rank")  # prefill: [layer, site, bin]
    pre, post = hist.sel(layer=0, site="mlp.act.pre").values, hist.sel(layer=0, site="mlp.act.post").values
    # The recorder's edges are fine near zero (sinh-spaced), so "at zero" is a window of bins.
    width = np.diff(edges)
    density = np.where(np.isfinite(width), pre / np.where(np.isfinite(width), width, 1.0), 0.0)
    window = (edges[:-1] >= -0.05) & (edges[1:] <= 0.05)
    right = edges[:-1] >= 0.05
    # The sharpest peak near zero sits at zero (SiLU also piles values up at its minimum, -0.278,
    # so look within +-0.2).
    near = (edges[:-1] >= -0.2) & (edges[1:] <= 0.2)
    assert window[int(np.argmax(np.where(near, density, 0.0)))]
    assert pre.sum() == post.sum()
    moved = pre[window].sum() - post[window].sum()
    assert moved > 0.05 * pre.sum()                               # a sizeable share left the zero window
    assert post[right].sum() > pre[right].sum()                   # ...outwards: the positive tail grew
    # Layer 1 has no ARM: its histograms before and after are identical.
    assert np.array_equal(hist.sel(layer=1, site="mlp.act.pre"), hist.sel(layer=1, site="mlp.act.post"))
    # The near-zero share (ARM's own eps at both sites) falls.
    nz = tr.activations["near_zero_count"].isel(step=0).sum("rank").sel(layer=0)
    assert int(nz.sel(site="mlp.act.post")) < int(nz.sel(site="mlp.act.pre"))

    # Independent recomputation of the prefill with the same seed, binned with numpy.
    model = load_llama(tiny_dir)
    arm = apply_arm(model, {"layers": [0]}, seed=0)[0]
    seen = {}
    with model.listening("layers.0.mlp.act.*", lambda x, hp: seen.__setitem__(hp.name, x.clone())), torch.no_grad():
        model(torch.tensor(tr.metadata["prompt_ids"]))
    for site, counts in (("pre", pre), ("post", post)):
        x = seen[f"layers.0.mlp.act.{site}"].double().numpy().ravel()
        ref = np.bincount(np.searchsorted(edges, x, side="right") - 1, minlength=len(edges) - 1)
        assert np.array_equal(ref, counts), site
    assert int(nz.sel(site="mlp.act.pre")) == round(arm.stats.near_zero_before * arm.stats.numel)
    assert int(nz.sel(site="mlp.act.post")) == round(arm.stats.near_zero_after * arm.stats.numel)
