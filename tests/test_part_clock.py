"""Part clocks: the stamps blocks take themselves bracket their parts, and change nothing else.

(Recorded traces, Llama and Perceiver AR, check every block's parts in test_recording.py and
test_perceiver_recording.py.)
"""
import time

import pytest
import torch

from workbench.models.config import LlamaConfig
from workbench.models.llama import Llama
from workbench.models.part_clock import BOUNDARIES, attach_part_clock, detach_part_clock

CFG = dict(vocab_size=259, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64,
           bos_id=256, eos_id=None)
# Hook points inside each part: a listener's clock reading must fall between the part's stamps.
INSIDE = {0: ("attn.in", "attn.out"), 1: ("attn_allreduce.partial", "attn_allreduce.normed"),
          2: ("mlp.in", "mlp.out"), 3: ("mlp_allreduce.partial", "mlp_allreduce.normed")}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Llama(LlamaConfig(**CFG)).eval()


def test_stamps_bracket_every_part_of_every_block(model):
    seen: dict[str, int] = {}

    def note(x, hp):
        seen[hp.name] = time.perf_counter_ns()

    names = [f"layers.{i}.{h}" for i in range(CFG["n_layers"]) for pair in INSIDE.values() for h in pair]
    tokens = torch.tensor([[1, 2, 3, 4, 5]])
    clock = attach_part_clock(model.layers, torch.device("cpu"))
    try:
        with model.listening(names, note):
            model(tokens)
    finally:
        detach_part_clock(model.layers)
    ns = clock.take()
    assert len(ns) == CFG["n_layers"] * BOUNDARIES and all(ns)
    assert ns == sorted(ns)  # forward order: block by block, boundary by boundary
    for layer in range(CFG["n_layers"]):
        for part, (first, last) in INSIDE.items():
            lo, hi = ns[layer * BOUNDARIES + part], ns[layer * BOUNDARIES + part + 1]
            assert lo <= seen[f"layers.{layer}.{first}"] <= seen[f"layers.{layer}.{last}"] <= hi
    assert clock.take() == [0] * len(ns)  # taken: the next pass starts from a fresh list


def test_a_clock_changes_no_output_and_detaches(model):
    tokens = torch.tensor([[7, 8, 9, 10]])
    with torch.inference_mode():
        plain = model(tokens)
        attach_part_clock(model.layers, torch.device("cpu"))
        timed = model(tokens)
        detach_part_clock(model.layers)
    assert torch.equal(plain, timed)
    assert all(block.part_clock is None for block in model.layers)

