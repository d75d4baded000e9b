"""Activation taps: blocks store the histogram sites' tensors, as their hook points pass them on.

(Recorded histograms are checked against an independent recomputation in test_recording.py.)
"""
import pytest
import torch

from workbench.models.activation_taps import TAP_SITES, attach_activation_taps, detach_activation_taps
from workbench.models.config import LlamaConfig
from workbench.models.llama import Llama
from workbench.probes.recorder import SITE_HOOKS as HOOKS  # site -> hook point under layers.{i}.

CFG = dict(vocab_size=259, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64,
           bos_id=256, eos_id=None)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Llama(LlamaConfig(**CFG)).eval()


def test_taps_hold_what_each_hook_point_passes_on(model):
    passed = {}

    def note(x, hp):
        passed[hp.name] = x

    def double(x, hp):  # a user's listener that replaces the tensor: the tap sees the replacement
        return x * 2

    names = [f"layers.{i}.{HOOKS[s]}" for i in range(CFG["n_layers"]) for s in TAP_SITES]
    taps = attach_activation_taps(model.layers)
    try:
        with model.listening(names, note), model.listening("layers.1.mlp.act.pre", double), torch.inference_mode():
            model(torch.tensor([[1, 2, 3, 4, 5]]))
    finally:
        detach_activation_taps(model.layers)
    assert len(taps) == CFG["n_layers"] * len(TAP_SITES)
    for layer in range(CFG["n_layers"]):
        for k, site in enumerate(TAP_SITES):
            tapped, seen = taps[layer * len(TAP_SITES) + k], passed[f"layers.{layer}.{HOOKS[site]}"]
            if (layer, site) == (1, "mlp.act.pre"):  # `double` ran after `note` there
                assert torch.equal(tapped, seen * 2)
            else:
                assert tapped is seen
    assert all(b.taps is None and b.mlp.taps is None for b in model.layers)


def test_taps_change_no_output(model):
    tokens = torch.tensor([[7, 8, 9, 10]])
    with torch.inference_mode():
        plain = model(tokens)
        taps = attach_activation_taps(model.layers)
        tapped = model(tokens)
        detach_activation_taps(model.layers)
    assert torch.equal(plain, tapped)
    assert all(t is not None for t in taps)
