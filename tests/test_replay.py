"""`workbench replay --verify`: re-run a recorded generation from the trace alone."""
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr

from workbench.models.config import LlamaConfig
from workbench.models.llama import Llama
from workbench.replay import verify
from workbench.runtime.checkpoint import save_llama
from workbench.runtime.sampler import SamplerConfig
from workbench.runtime.session import RunSpec, run
from workbench.runtime.tokenizer import ByteTokenizer


@pytest.fixture(scope="module")
def trace(tmp_path_factory):
    torch.manual_seed(3)
    root = tmp_path_factory.mktemp("replay")
    save_llama(Llama(LlamaConfig(vocab_size=259, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                                 max_seq_len=128, bos_id=256)), root / "model", ByteTokenizer(eos_id=None))
    spec = RunSpec(model=str(root / "model"), prompts=["abc", "hello"], max_new_tokens=12, record=str(root / "t.zarr"),
                   sampler=SamplerConfig(temperature=0.8, top_k=20, seed=7), device="cpu", probes=["sampler", "kv"])
    run(spec)
    return root


def test_verify_reproduces_a_sampled_run(trace):
    report = verify(trace / "t.zarr")
    assert report.ok and report.checkpoint_matches and report.steps_checked == 12
    assert report.recorded == report.replayed


def test_verify_names_the_first_differing_step(trace, tmp_path):
    copy = tmp_path / "tampered.zarr"
    shutil.copytree(trace / "t.zarr", copy)
    ids = zarr.open_array(str(copy / "tokens" / "token_id"), mode="r+")
    row = ids[1]
    row[5 + 1 + 7] = (int(row[5 + 1 + 7]) + 1) % 256  # sequence 1: bos + 5 prompt bytes, then step 7's token
    ids[1] = row
    out = subprocess.run([sys.executable, "-m", "workbench.cli", "replay", str(copy), "--verify"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "differs at step 7, sequence 1" in out.stdout


def test_replay_of_a_missing_trace_is_a_clear_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "workbench.cli", "replay", str(tmp_path / "nope"), "--verify"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_a_bfloat16_run_records_its_dtype_and_replays_in_it(trace, tmp_path):
    """--dtype bfloat16 halves a model's memory; a trace says which dtype ran, and replay uses it
    (bfloat16 and float32 pick different tokens on this model within 12 steps)."""
    from workbench.runtime.session import load_model
    from workbench.trace.reader import open_trace
    model, _ = load_model(trace / "model", torch.device("cpu"), dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    spec = RunSpec(model=str(trace / "model"), prompts=["abc", "hello"], max_new_tokens=12, device="cpu",
                   sampler=SamplerConfig(temperature=0.8, top_k=20, seed=7), dtype="bfloat16",
                   record=str(tmp_path / "bf16.zarr"), probes=["sampler", "activations"])
    result = run(spec)
    t = open_trace(tmp_path / "bf16.zarr")
    assert t.metadata["dtype"] == "bfloat16" and open_trace(trace / "t.zarr").metadata["dtype"] == "float32"
    from workbench.views.run_info import run_summary
    assert run_summary(t)["model"]["dtype that ran"] == "bfloat16"
    counts = t.activations.value_count.values[1:]                     # decode steps: one row per sequence
    assert (t.activations.hist_count.values[1:].sum(-1) == counts).all() and (counts > 0).all()
    report = verify(tmp_path / "bf16.zarr")
    assert report.ok and report.replayed == result.generated
    float32 = run(RunSpec(**{**spec.to_dict(), "sampler": spec.sampler, "dtype": "float32", "record": None}))
    assert float32.generated != result.generated
