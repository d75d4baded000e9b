"""Perceiver and Perceiver AR: exact caching, an independent reference, hook points, weight sharing,
errors, checkpoints, the runtime's generate loop, and TP=2 == TP=1 with real gloo processes."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from workbench.errors import WorkbenchError
from workbench.models.perceiver import PerceiverAR, PerceiverClassifier, PerceiverConfig
from workbench.runtime.generate import generate
from workbench.runtime.perceiver_checkpoint import load_perceiver, save_perceiver


def _ar_cfg(**kw) -> PerceiverConfig:
    base = dict(d_model=32, n_latents=5, n_heads=4, n_kv_heads=2, n_self_layers=2, n_repeats=2, d_ff=48,
                max_seq_len=64)
    base.update(kw)
    return PerceiverConfig(**base)


def _ar(**kw) -> PerceiverAR:
    torch.manual_seed(0)
    return PerceiverAR(_ar_cfg(**kw)).eval()


# --- an independent reference: the paper's equations for one sequence, plain loops and einsums --
def _reference_last_logits(m: PerceiverAR, seq: torch.Tensor) -> torch.Tensor:
    """Logits at the last position of ``seq`` [L], written from the definition, not the model's code."""
    cfg = m.cfg
    H, KVH, hd, N = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_latents
    L = len(seq)
    lat_pos, in_pos = torch.arange(max(0, L - N), L), torch.arange(L)

    def rms(norm, x):
        return norm.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)

    def rope(t, pos):  # t [n, heads, hd]
        cos, sin = m.rotary.cos[pos][:, None], m.rotary.sin[pos][:, None]
        return t * cos + torch.cat([-t[..., hd // 2:], t[..., :hd // 2]], -1) * sin

    def attend(q, k, v, allowed):  # q [n, H, hd]; k, v [m, KVH, hd]; allowed [n, m]
        k, v = k.repeat_interleave(H // KVH, 1), v.repeat_interleave(H // KVH, 1)
        s = torch.einsum("nhd,mhd->hnm", q, k) / math.sqrt(hd)
        p = s.masked_fill(~allowed, float("-inf")).softmax(-1)
        return torch.einsum("hnm,mhd->nhd", p, v).reshape(q.shape[0], H * hd)

    def mlp(mod, x):
        return mod.down_proj(F.silu(mod.gate_proj(x)) * mod.up_proj(x))

    def heads(lin, x, n):
        return lin(x).view(x.shape[0], n, hd)

    x = m.embed_tokens(seq)
    z = x[lat_pos]  # the latents start as their bytes' embeddings
    for rep in m.repeats:
        inp = rms(rep.kv_norm, x)
        k, v = rope(heads(rep.cross.k_proj, inp, KVH), in_pos), heads(rep.cross.v_proj, inp, KVH)
        q = rope(heads(rep.cross.q_proj, rms(rep.q_norm, z), H), lat_pos)
        z = z + rep.cross.o_proj(attend(q, k, v, in_pos[None, :] <= lat_pos[:, None]))
        z = z + mlp(rep.cross_mlp, rms(rep.cross_mlp_norm, z))
        for blk in rep.layers:
            hh = rms(blk.input_norm, z)
            q = rope(heads(blk.attn.q_proj, hh, H), lat_pos)
            k, v = rope(heads(blk.attn.k_proj, hh, KVH), lat_pos), heads(blk.attn.v_proj, hh, KVH)
            z = z + blk.attn.o_proj(attend(q, k, v, lat_pos[None, :] <= lat_pos[:, None]))
            z = z + mlp(blk.mlp, rms(blk.post_attn_norm, z))
    return m.lm_head(rms(m.norm, z))[-1]


@pytest.mark.parametrize("kw", [dict(), dict(n_repeats=3, share_weights=True), dict(n_repeats=1, n_self_layers=0)])
@torch.no_grad()
def test_forward_matches_independent_reference(kw):
    m = _ar(**kw)
    seq = torch.randint(0, 256, (2, 12))
    for L in (1, 4, 5, 6, 12):  # shorter than, equal to and longer than the latent window (5)
        got = m(seq[:, :L])
        assert got.shape == (2, min(L, 5), 259)
        for j in range(2):
            ref = _reference_last_logits(m, seq[j, :L])
            assert torch.allclose(got[j, -1], ref, atol=1e-5), (L, float((got[j, -1] - ref).abs().max()))


# --- caching ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(), dict(n_repeats=3, share_weights=True), dict(n_repeats=1, n_kv_heads=4)])
@torch.no_grad()
def test_incremental_decoding_equals_full_recompute(kw):
    m = _ar(**kw)
    seq = torch.randint(0, 256, (2, 16))
    cache = m.make_cache(batch=2, max_len=16)
    got = {3: m(seq[:, :3], cache)[:, -1]}  # prefill 3 (< 5 latents), then one byte at a time
    for p in range(3, 15):
        got[p + 1] = m(seq[:, p:p + 1], cache, start_pos=torch.full((2,), p))[:, -1]
    for L, logits in got.items():
        ref = m(seq[:, :L])[:, -1]
        assert float((logits - ref).abs().max()) < 1e-5, L
    assert cache.recomputes == 15 - 5  # the stack is rebuilt exactly on the steps whose window slid


@torch.no_grad()
def test_chunked_prefill_longer_than_window_then_decode():
    m = _ar()
    seq = torch.randint(0, 256, (1, 20))
    cache = m.make_cache(batch=1, max_len=20)
    m(seq[:, :11], cache)                                  # 11 > 5 latents
    m(seq[:, 11:14], cache, start_pos=torch.tensor([11]))  # a chunk of 3
    last = m(seq[:, 14:15], cache, start_pos=torch.tensor([14]))
    assert float((last[:, -1] - m(seq[:, :15])[:, -1]).abs().max()) < 1e-5


@torch.no_grad()
def test_cache_rejects_a_gap_and_reports_stats():
    m = _ar()
    cache = m.make_cache(batch=1, max_len=16)
    m(torch.randint(0, 256, (1, 4)), cache)
    with pytest.raises(WorkbenchError, match="start_pos must be 4, got 6"):
        m(torch.tensor([[1]]), cache, start_pos=torch.tensor([6]))
    cache.set_lengths([4])
    s, parts = cache.stats(), cache.stats_by_part()
    kv_token = 2 * 2 * 8 * 4  # K and V, 2 kv heads, head_dim 8, float32
    assert parts["input"].tokens == 4 and parts["input"].bytes_used == 4 * kv_token * 2  # 2 cross-attentions
    assert parts["latent"].tokens == 4 and parts["latent"].bytes_used == 4 * kv_token * 4  # 2 repeats x 2 layers
    assert parts["cross"].bytes_used == 4 * 2 * 32 * 4  # residual and normed, d_model 32
    assert s.bytes_used == sum(p.bytes_used for p in parts.values()) <= s.bytes_reserved


@torch.no_grad()
def test_cache_usage_counts_ring_slots_through_fill_and_release():
    m = _ar()  # 5 latents
    cache = m.make_cache(batch=2, max_len=16)
    seq = torch.randint(0, 256, (2, 9))
    m(seq[:, :3], cache)
    cache.set_lengths([3, 3])
    usages, totals = [cache.usage()], [cache.stats()]
    for pos in range(3, 9):  # the rings fill at position 4, then the windows slide
        m(seq[:, pos:pos + 1], cache, start_pos=torch.tensor([pos, pos]))
        cache.set_lengths([pos + 1] * 2)
        usages.append(cache.usage())
        totals.append(cache.stats())
        assert usages[-1][2] == int((cache.slot_pos >= 0).sum()) == 2 * min(5, pos + 1)
    per_step = cache.stats_of(*np.array(usages).T)  # what a recorder's batch computes
    assert per_step.bytes_used.tolist() == [t.bytes_used for t in totals]
    assert per_step.tokens.tolist() == [t.tokens for t in totals]
    cache.release(1)
    assert cache.usage()[2] == 5 == int((cache.slot_pos >= 0).sum())


# --- hook points -------------------------------------------------------------------------------
@torch.no_grad()
def test_cross_attention_rows_are_causal_and_sum_to_one():
    m = _ar()
    seq = torch.randint(0, 256, (2, 9))
    seen: dict[str, list] = {}

    def grab(x, hp):
        seen.setdefault(hp.name, []).append((x.clone(), dict(m.info.extra["perceiver"])))

    plain = m(seq)
    with m.listening(["repeats.*.cross.pattern", "repeats.*.layers.*.attn.pattern"], grab):
        recorded = m(seq)  # no cache: 5 latents (positions 4..8) over 9 inputs
        cache = m.make_cache(batch=2, max_len=9)
        m(seq[:, :7], cache)
        m(seq[:, 7:8], cache, start_pos=torch.full((2,), 7))
    assert torch.allclose(plain, recorded, atol=1e-5)  # the manual softmax path gives SDPA's numbers
    assert set(seen) == {"repeats.0.cross.pattern", "repeats.1.cross.pattern",
                         *(f"repeats.{r}.layers.{i}.attn.pattern" for r in (0, 1) for i in (0, 1))}
    for name, calls in seen.items():
        for pattern, axes in calls:
            b, h, nq, nk = pattern.shape
            assert h == 4
            assert torch.allclose(pattern.sum(-1), torch.ones(b, h, nq), atol=1e-6)
            if ".cross." in name:
                rows = axes["cross0_latents"] if name.startswith("repeats.0.") else axes["latents"]
                keys = torch.arange(nk).expand(b, nk)
            else:
                rows, keys = axes["latents"], axes["latent_keys"]
            assert rows.shape == (b, nq)
            future = (keys[:, None, :] > rows[:, :, None]) | (keys[:, None, :] < 0)  # [b, q, k]
            future &= rows[:, :, None] >= 0  # padding rows (none here) are unused
            assert float(pattern.masked_fill(~future[:, None], 0).abs().max()) == 0
            if ".cross." in name and rows[0, -1] >= 0:
                assert float(pattern[0, :, -1, int(rows[0, -1])].min()) > 0  # a latent sees its own byte
    first = seen["repeats.0.cross.pattern"][0][0]
    assert first.shape == (2, 4, 5, 9)  # [b, heads, latent, input]
    assert seen["repeats.0.layers.0.attn.pattern"][0][0].shape == (2, 4, 5, 5)  # [b, heads, latent, latent]


def test_hook_points_name_repeats_even_when_weights_are_shared():
    m = _ar(n_repeats=3, share_weights=True)
    names = set(m.hook_points)
    for r in range(3):
        for site in ("cross.pattern", "cross.in", "cross.out", "cross_allreduce.reduced", "cross_mlp.act.pre",
                     "cross_mlp_allreduce.normed", "layers.1.attn.pattern", "layers.1.mlp.act.post",
                     "layers.0.mlp_allreduce.timing"):
            assert f"repeats.{r}.{site}" in names, (r, site)
    hp = m.hook_points["repeats.2.cross.pattern"]
    assert (hp.repeat, hp.layer) == (2, None)
    hp = m.hook_points["repeats.2.layers.1.attn.pattern"]
    assert (hp.repeat, hp.layer) == (2, 1)
    assert {"logits", "embed"} <= names


# --- weight sharing ---------------------------------------------------------------------------
def _n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


def test_weight_sharing_shares_parameters_and_accumulates_gradients():
    shared = _ar(n_repeats=3, share_weights=True)
    free = _ar(n_repeats=3, share_weights=False)
    rep0, rep1 = shared.repeats[0], shared.repeats[1]
    per_cross = sum(p.numel() for n, p in free.repeats[0].named_parameters() if not n.startswith("layers."))
    per_latent = sum(p.numel() for p in free.repeats[0].layers.parameters())
    assert _n_params(free) - _n_params(shared) == per_cross + 2 * per_latent  # repeat 2's cross, repeats 1-2's stacks
    assert shared.repeats[2].layers[1].attn.q_proj.weight is rep0.layers[1].attn.q_proj.weight
    assert shared.repeats[2].cross.k_proj.weight is rep1.cross.k_proj.weight
    assert shared.repeats[2].q_norm.weight is rep1.q_norm.weight
    assert rep1.cross.k_proj.weight is not rep0.cross.k_proj.weight  # the first cross-attention keeps its own
    assert shared.repeats[2].cross is not rep1.cross  # own module, own hook points

    # The same function unshared: copy the shared weights into every repeat; the shared gradient is the sum.
    with torch.no_grad():
        for r in range(3):
            for name, p in free.repeats[r].named_parameters():
                src = rep0 if name.startswith("layers.") or r == 0 else rep1
                p.copy_(dict(src.named_parameters())[name])
        for name in ("embed_tokens.weight", "lm_head.weight", "norm.weight"):
            dict(free.named_parameters())[name].copy_(dict(shared.named_parameters())[name])
    seq = torch.randint(0, 256, (2, 9))
    losses = [F.cross_entropy(m(seq[:, :-1]).flatten(0, 1), seq[:, -5:].flatten()) for m in (shared, free)]
    assert torch.allclose(losses[0], losses[1], atol=1e-6)
    for loss in losses:
        loss.backward()
    g = lambda m, r, n: dict(m.repeats[r].named_parameters())[n].grad  # noqa: E731
    name = "layers.0.mlp.gate_proj.weight"
    assert torch.allclose(g(shared, 0, name), sum(g(free, r, name) for r in range(3)), atol=1e-6)
    name = "cross.v_proj.weight"
    assert torch.allclose(g(shared, 1, name), g(free, 1, name) + g(free, 2, name), atol=1e-6)
    assert torch.allclose(g(shared, 0, name), g(free, 0, name), atol=1e-6)


# --- classifier --------------------------------------------------------------------------------
def _clf(**kw) -> PerceiverClassifier:
    torch.manual_seed(0)
    base = dict(model_type="perceiver", d_model=32, n_latents=6, n_heads=4, n_self_layers=1, n_repeats=3,
                share_weights=True, d_ff=48, max_seq_len=40, n_classes=3, n_fourier_bands=4)
    base.update(kw)
    return PerceiverClassifier(PerceiverConfig(**base)).eval()


@torch.no_grad()
def test_classifier_averages_latents_and_masks_padding():
    m = _clf()
    tokens = torch.randint(0, 256, (2, 20))
    pooled = []
    with m.listening("pooled", lambda x, hp: pooled.append(x)):
        logits = m(tokens, lengths=torch.tensor([20, 12]))
    assert logits.shape == (2, 3)
    assert torch.allclose(logits, m.head(pooled[0]), atol=1e-6)
    other = tokens.clone()
    other[1, 12:] = torch.randint(0, 256, (8,))  # change only the padding
    assert torch.allclose(m(other, lengths=torch.tensor([20, 12])), logits, atol=1e-6)
    assert not torch.allclose(m(other)[1], logits[1], atol=1e-4)  # unmasked, the padding matters
    maps = []
    with m.listening("repeats.*.cross.pattern", lambda x, hp: maps.append(x)):
        m(tokens, lengths=torch.tensor([20, 12]))
    assert len(maps) == 3 and maps[0].shape == (2, 4, 6, 20)  # [b, heads, latent, input] per repeat
    assert float(maps[0][1, :, :, 12:].abs().max()) == 0
    assert torch.allclose(maps[2].sum(-1), torch.ones(2, 4, 6), atol=1e-6)
    with pytest.raises(WorkbenchError, match="does not generate"):
        generate(m, [[1, 2]], 2)


# --- errors ------------------------------------------------------------------------------------
def test_bad_shapes_and_configs_raise_clear_errors():
    m = _ar()
    cases = [
        (lambda: m(torch.zeros(4, dtype=torch.long)), r"tokens must be a \[batch, seq\] tensor.*\(4,\)"),
        (lambda: m(torch.zeros(1, 2, 3, dtype=torch.long)), r"tokens must be a \[batch, seq\]"),
        (lambda: m(torch.zeros(1, 3)), "tokens must be integer ids"),
        (lambda: m(torch.tensor([[1, 300]])), "token id 300 is outside the vocabulary of 259"),
        (lambda: m(torch.zeros(2, 3, dtype=torch.long), start_pos=torch.zeros(3, dtype=torch.long)),
         r"start_pos must have shape \[batch\] = \(2,\), got \(3,\)"),
        (lambda: m(torch.zeros(2, 3, dtype=torch.long), logits_index=torch.tensor([0, 3])),
         r"logits_index must lie in \[0, 3\)"),
        (lambda: m(torch.zeros(1, 65, dtype=torch.long)), "position 64 exceeds max_seq_len 64"),
        (lambda: m(torch.zeros(1, 1, dtype=torch.long), start_pos=torch.tensor([3])), "start_pos > 0 needs a cache"),
        (lambda: m(torch.zeros(3, 1, dtype=torch.long), m.make_cache(batch=2, max_len=8)),
         "tokens have batch 3 but the Perceiver AR cache was made for 2"),
        (lambda: _clf()(torch.zeros(2, 5, dtype=torch.long), lengths=torch.tensor([5, 0])), r"lengths must lie in \[1, 5\]"),
        (lambda: _clf()(torch.zeros(1, 41, dtype=torch.long)), "byte array of 41 exceeds max_seq_len 40"),
        (lambda: PerceiverConfig(d_model=30, n_heads=4), "d_model 30 is not divisible by n_heads 4"),
        (lambda: PerceiverConfig(n_heads=4, n_kv_heads=3), "n_heads 4 is not a multiple of n_kv_heads 3"),
        (lambda: PerceiverConfig(n_latents=0), "n_latents must be >= 1"),
        (lambda: PerceiverConfig(model_type="perceiver"), "needs n_classes >= 1"),
        (lambda: PerceiverConfig(model_type="gpt"), "unknown Perceiver model_type 'gpt'"),
        (lambda: PerceiverConfig.from_dict({"n_latent": 3}), "unknown key 'n_latent'"),
        (lambda: PerceiverClassifier(PerceiverConfig()), "needs model_type 'perceiver'"),
        (lambda: generate(m, [[1] * 60], 8), "exceeds the model's context of 64"),
    ]
    for fn, msg in cases:
        with pytest.raises(WorkbenchError, match=msg):
            fn()


# --- checkpoints and the runtime -----------------------------------------------------------
@torch.no_grad()
def test_save_load_round_trip(tmp_path):
    m = _ar(n_repeats=3, share_weights=True)
    save_perceiver(m, tmp_path / "ar")
    cfg = json.loads((tmp_path / "ar" / "config.json").read_text())
    assert cfg["model_type"] == "perceiver_ar" and cfg["share_weights"] is True
    back = load_perceiver(tmp_path / "ar")
    assert back.repeats[2].layers[0].attn.q_proj.weight is back.repeats[0].layers[0].attn.q_proj.weight
    seq = torch.randint(0, 256, (2, 9))
    assert torch.equal(back(seq), m(seq))
    c = _clf()
    save_perceiver(c, tmp_path / "clf")
    assert torch.equal(load_perceiver(tmp_path / "clf")(seq), c(seq))

    from safetensors.torch import load_file, save_file
    state = load_file(tmp_path / "ar" / "model.safetensors")
    state["lm_head.weight"] = state["lm_head.weight"][:, :16].contiguous()
    save_file(state, tmp_path / "ar" / "model.safetensors")
    with pytest.raises(WorkbenchError, match=r"tensor 'lm_head.weight' has shape \(259, 16\), config implies \(259, 32\)"):
        load_perceiver(tmp_path / "ar")
    del state["lm_head.weight"]
    save_file(state, tmp_path / "ar" / "model.safetensors")
    with pytest.raises(WorkbenchError, match="checkpoint lacks 1 tensors, e.g. 'lm_head.weight'"):
        load_perceiver(tmp_path / "ar")


def _greedy_by_recompute(m, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(m(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


@torch.no_grad()
def test_generate_batch_of_different_prompt_lengths_equals_each_alone():
    m = _ar(n_repeats=2, share_weights=True)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (2, 7, 13)]  # around 5 latents
    batch = generate(m, prompts, 9)
    for p, got in zip(prompts, batch.generated):
        assert generate(m, [p], 9).generated[0] == got
        assert _greedy_by_recompute(m, p, 9) == got
    assert len(batch.step_seconds) == 9


# --- tensor parallelism: real gloo processes ---------------------------------------------------
_TP_KW = dict(d_model=32, n_latents=4, n_heads=4, n_kv_heads=2, n_self_layers=1, n_repeats=3, share_weights=True,
              d_ff=48, max_seq_len=32)
_TP_PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12]]


def _tp_run(rank: int, world: int, algorithm: str | None):
    """Full-sequence logits, cross-attention maps and a greedy generation (with the cache)."""
    from workbench.runtime.perceiver_tp import shard_perceiver
    torch.manual_seed(0)
    m = PerceiverAR(PerceiverConfig(**_TP_KW)).eval()
    if algorithm is not None:
        shard_perceiver(m, rank, world, None, algorithm)
    steps = []
    with torch.no_grad():
        maps = []
        with m.listening("repeats.1.cross.pattern", lambda x, hp: maps.append(x.clone())):
            logits = m(torch.arange(10, 30)[None])
        res = generate(m, _TP_PROMPTS, 10, on_step=lambda ev: steps.append(ev.cand_probs.clone()))
    return {"logits": logits, "map": maps[0], "tokens": res.generated, "probs": torch.stack(steps)}


def _tp_worker(rank: int, world: int, init: str, out_dir: str) -> None:
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        out = {alg: _tp_run(rank, world, alg) for alg in ("allreduce", "reduce_scatter")}
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_tp2_equals_tp1_with_real_gloo_processes(tmp_path):
    import torch.multiprocessing as mp
    world = 2
    mp.spawn(_tp_worker, args=(world, f"file://{tmp_path}/rdzv", str(tmp_path)), nprocs=world, join=True)
    ref = _tp_run(0, 1, None)
    parts = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for alg in ("allreduce", "reduce_scatter"):
        for p in parts:
            got = p[alg]
            assert float((got["logits"] - ref["logits"]).abs().max()) < 1e-5, alg
            assert got["tokens"] == ref["tokens"], alg
            assert float((got["probs"] - ref["probs"]).abs().max()) < 1e-5, alg
        # each rank records its own heads of the cross-attention map
        both = torch.cat([p[alg]["map"] for p in parts], dim=1)
        assert both.shape == ref["map"].shape and float((both - ref["map"]).abs().max()) < 1e-5, alg


@pytest.mark.slow
def test_session_loads_perceiver_ar_by_model_type_and_runs_tp2(tmp_path):
    """The runtime's own path: session.load_model dispatches on config.json; --tp 2 spawns gloo ranks."""
    from workbench.runtime.checkpoint import load_llama
    from workbench.runtime.session import RunSpec, load_model, run, run_local
    torch.manual_seed(0)
    save_perceiver(PerceiverAR(PerceiverConfig(**_TP_KW)), tmp_path / "par")
    model, tok = load_model(tmp_path / "par", torch.device("cpu"))
    assert isinstance(model, PerceiverAR) and tok.eos_id == 257
    with pytest.raises(WorkbenchError, match="holds a perceiver_ar model, not a Llama"):
        load_llama(tmp_path / "par")
    spec = RunSpec(model=str(tmp_path / "par"), prompts=["ab", "hello"], max_new_tokens=6, device="cpu")
    one = run_local(spec)
    spec.tp = 2
    two = run(spec)
    assert two.generated == one.generated and len(one.generated[1]) >= 1
