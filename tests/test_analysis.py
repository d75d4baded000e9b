"""Head scores: hand-built maps with known answers, and the default model against transformers."""
import json

import numpy as np
import pytest
import torch

from workbench.analysis import (PYTHON_SNIPPET, attention_maps, attention_sites, best_head, format_head_scores,
                                head_scores, induction_scores_from_maps, induction_targets,
                                previous_token_scores_from_maps, repeated_random_bytes)
from workbench.runtime.session import DEFAULT_MODEL
from workbench.training.train import TrainConfig, build_llama, build_perceiver_ar

T = 12


def _prev_token_map() -> np.ndarray:
    m = np.zeros((T, T))
    m[0, 0] = 1
    m[np.arange(1, T), np.arange(T - 1)] = 1
    return m


def _uniform_causal_map() -> np.ndarray:
    m = np.tril(np.ones((T, T)))
    return m / m.sum(axis=1, keepdims=True)


def test_previous_token_score_of_known_maps():
    maps = np.stack([_prev_token_map(), _uniform_causal_map()])[None]  # [site 1, head 2, q, k]
    scores = previous_token_scores_from_maps(maps)
    assert scores.shape == (1, 2)
    assert scores[0, 0] == pytest.approx(1.0)
    assert scores[0, 1] == pytest.approx(np.mean([1 / (q + 1) for q in range(1, T)]))
    # A leading batch axis averages over sequences; NaN queries are skipped, not counted as zero.
    batched = np.stack([maps, maps])
    batched[1, 0, 0, 5:] = np.nan
    assert previous_token_scores_from_maps(batched)[0, 0] == pytest.approx(1.0)


def test_induction_targets_point_after_earlier_occurrences():
    tokens = np.array([7, 1, 2, 3, 1, 2, 3, 9])
    tgt = induction_targets(tokens)
    assert tgt.shape == (8, 8)
    assert [tuple(np.flatnonzero(r)) for r in tgt] == [(), (), (), (), (2,), (3,), (4,), ()]


def test_induction_score_of_a_perfect_induction_head_is_one():
    tokens = repeated_random_bytes(batch=2, length=10, seed=3).numpy()  # [2, 21]
    assert (tokens[:, 1:11] == tokens[:, 11:]).all() and len(set(tokens[0, 1:11])) == 10
    t = tokens.shape[1]
    perfect = np.zeros((2, 1, 2, t, t))
    perfect[..., np.arange(t), np.arange(t)] = 1.0           # heads attend to themselves by default
    for q in range(11, t):
        perfect[:, 0, 0, q, :] = 0
        perfect[:, 0, 0, q, q - 10 + 1] = 1.0                 # the byte after the earlier occurrence
    scores = induction_scores_from_maps(perfect, tokens)
    assert scores[0, 0] == pytest.approx(1.0)
    assert scores[0, 1] == pytest.approx(0.0)


def test_head_scores_shape_and_printout_for_both_model_kinds():
    tc = TrainConfig(minutes=None, steps=1, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                     seq_len=32, max_seq_len=512, n_latents=128)
    torch.manual_seed(0)
    for model, n_sites in [(build_llama(tc), 2), (build_perceiver_ar(tc), 3)]:
        sites = attention_sites(model)
        assert len(sites) == n_sites
        for kind in ("previous_token", "induction"):
            s = head_scores(model, kind)
            assert s.shape == (n_sites, 4) and np.isfinite(s).all() and (0 <= s).all() and (s <= 1).all()
            text = format_head_scores(s, kind, sites)
            b = best_head(s)
            assert f"row {b['layer']} head {b['head']}" in text and "*" in text
    with pytest.raises(ValueError, match="unknown head score"):
        head_scores(model, "bogus")


def test_perceiver_maps_sit_on_the_absolute_grid():
    tc = TrainConfig(minutes=None, steps=1, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64,
                     seq_len=32, max_seq_len=64, n_latents=8)
    model = build_perceiver_ar(tc)
    tokens = torch.randint(0, 256, (1, 20))
    maps, sites = attention_maps(model, tokens)
    assert maps.shape == (1, 2, 4, 20, 20)
    cross, latent = maps[0, 0], maps[0, 1]
    assert np.isnan(cross[:, :12]).all() and np.allclose(np.nansum(cross[:, 12:], -1), 1)  # last 8 queries
    assert np.isnan(latent[:, 12:, :12]).all()  # latent self-attention sees only the latents
    assert np.allclose(latent[:, 12:, 12:].sum(-1), 1)


needs_default = pytest.mark.skipif(not (DEFAULT_MODEL / "model.safetensors").exists(),
                                   reason="default model not trained yet")


@needs_default
def test_maps_and_previous_token_scores_match_transformers_on_the_default_model():
    """Independent reference: transformers' eager attention weights on the same checkpoint."""
    transformers = pytest.importorskip("transformers")
    from workbench.runtime.checkpoint import load_llama
    ours = load_llama(DEFAULT_MODEL)
    hf = transformers.LlamaForCausalLM.from_pretrained(DEFAULT_MODEL, attn_implementation="eager").eval()
    ids = torch.tensor([[256] + list(PYTHON_SNIPPET.encode())])
    maps, _ = attention_maps(ours, ids)
    with torch.no_grad():
        ref = torch.stack(hf(ids, output_attentions=True).attentions, dim=1).numpy()  # [b, layer, head, q, k]
    np.testing.assert_allclose(maps, ref, atol=1e-5)
    np.testing.assert_allclose(head_scores(ours, "previous_token"), previous_token_scores_from_maps(ref),
                               atol=1e-5)


@needs_default
def test_default_model_scores_match_its_report():
    from workbench.runtime.checkpoint import load_llama
    report = json.loads((DEFAULT_MODEL / "train_report.json").read_text())
    model = load_llama(DEFAULT_MODEL)
    for kind in ("previous_token", "induction"):
        np.testing.assert_allclose(head_scores(model, kind), np.array(report["head_scores"][kind]), atol=2e-3)
    # A trained byte model has a sharp previous-token head (random init gives ~0.1 on this snippet).
    assert report["best_heads"]["previous_token"]["score"] > 0.5


def test_scores_from_a_recorded_trace_equal_scores_from_a_full_forward(tmp_path):
    from workbench.analysis import head_scores_from_trace
    from workbench.runtime.checkpoint import save_llama
    from workbench.runtime.session import RunSpec, run
    from workbench.runtime.tokenizer import ByteTokenizer
    from workbench.trace.reader import open_trace
    tc = TrainConfig(minutes=None, steps=1, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                     seq_len=32, max_seq_len=128)
    torch.manual_seed(0)
    model = build_llama(tc)
    save_llama(model, tmp_path / "m", ByteTokenizer(259, 256, 257))
    spec = RunSpec(model=str(tmp_path / "m"), prompts=["x = a + b\nx = a + b\n"], max_new_tokens=6,
                   record=str(tmp_path / "t.zarr"), device="cpu")
    run(spec)
    trace = open_trace(tmp_path / "t.zarr")
    ids = trace.token_ids(0)[:-1].astype(np.int64)  # the last token is never fed back
    maps, _ = attention_maps(model, torch.from_numpy(ids[None]))
    for kind, ref in [("previous_token", previous_token_scores_from_maps(maps)),
                      ("induction", induction_scores_from_maps(maps, ids[None]))]:
        got = head_scores_from_trace(trace, kind)
        assert got.shape == (2, 4)
        np.testing.assert_allclose(got, ref, atol=2e-3)  # maps are stored as float16
