"""compare_traces / `workbench compare` on real recorded runs (the paper's experiment in miniature)."""
import numpy as np
import pytest
import torch

from workbench.cli import main
from workbench.compare import compare_traces, format_comparison
from workbench.errors import WorkbenchError
from workbench.models.config import LlamaConfig
from workbench.models.llama import Llama
from workbench.probes.selection import ProbeSelection
from workbench.runtime.checkpoint import save_llama
from workbench.runtime.session import RunSpec, run
from workbench.runtime.tokenizer import ByteTokenizer
from workbench.trace import open_trace

PROMPT = "def add(a, b):\n    return"
SLASHES = PROMPT + "/" * 55  # the paper's meaningless tokens


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("compare")
    model = root / "model"
    save_llama(Llama(LlamaConfig(vocab_size=259, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128,
                                 max_seq_len=256, bos_id=256, eos_id=None)).eval(),
               model, ByteTokenizer(bos_id=256, eos_id=None))
    out = {}
    for name, prompt, arm in (("base", PROMPT, None), ("slashes", SLASHES, None),
                              ("arm", PROMPT, {"layers": [0]})):
        out[name] = root / f"{name}.zarr"
        run(RunSpec(model=str(model), prompts=[prompt], max_new_tokens=3, device="cpu", arm=arm,
                    record=str(out[name]), probes=ProbeSelection.parse("activations")))
    return out


def test_compare_arm_off_and_on(traces):
    ds = compare_traces(traces["base"], traces["arm"], steps="prefill", labels=("off", "on"))
    assert list(ds["run"].values) == ["off", "on"]
    assert set(ds["site"].values) >= {"mlp.act.pre", "mlp.act.post"}
    # Histograms are shares per (run, layer, site) on the trace's edges.
    np.testing.assert_allclose(ds["hist_fraction"].sum("bin"), 1.0, rtol=1e-12)
    assert ds["bin_lower"].size == ds["bin"].size
    # Deltas are b - a.
    for name in ("near_zero_fraction", "std", "hist_fraction"):
        np.testing.assert_array_equal(ds[f"delta_{name}"], ds[name].sel(run="on") - ds[name].sel(run="off"))
    l0 = ds.sel(layer=0)
    # Same prompt, ARM sits after act.pre: layer 0's act.pre is the same in both runs (prefill).
    assert float(abs(l0["delta_hist_fraction"].sel(site="mlp.act.pre")).max()) == 0.0
    assert int(l0["delta_count"].sel(site="mlp.act.pre")) == 0
    # (near_zero_fraction is not compared across these runs: each counts with its own recorded eps,
    # ARM's MAD-based one when ARM is on, the trace's fixed one when it is off.)
    # ARM on: the near-zero share after redistribution falls; with it off, pre and post agree.
    on, off = l0.sel(run="on"), l0.sel(run="off")
    assert float(on["near_zero_fraction"].sel(site="mlp.act.post")) < float(on["near_zero_fraction"].sel(site="mlp.act.pre"))
    assert float(off["near_zero_fraction"].sel(site="mlp.act.post")) == float(off["near_zero_fraction"].sel(site="mlp.act.pre"))
    assert float(l0["delta_std"].sel(site="mlp.act.post")) > 0  # mass moved outwards


def test_compare_matches_the_raw_trace(traces):
    ds = compare_traces(traces["base"], traces["slashes"])
    for label, key in (("a", "base"), ("b", "slashes")):
        act = open_trace(traces[key]).activations
        counts = act["hist_count"].sum(["step", "rank"]).values  # every step committed and written
        frac = counts / counts.sum(-1, keepdims=True)
        np.testing.assert_allclose(ds["hist_fraction"].sel(run=label).transpose("layer", "site", "bin"), frac)
        n = act["value_count"].sum(["step", "rank"]).values
        mean = act["value_sum"].sum(["step", "rank"]).values / n
        np.testing.assert_allclose(ds["mean"].sel(run=label).transpose("layer", "site"), mean, rtol=1e-12)
    # The prompt with 55 extra tokens has 55 more positions of d_ff values per layer and site in the prefill.
    pre = compare_traces(traces["base"], traces["slashes"], steps="prefill")
    assert int(pre["delta_count"].sel(layer=0, site="mlp.act.pre")) == 55 * 128


def test_table_and_cli(traces, capsys):
    ds = compare_traces(traces["base"], traces["arm"], steps="prefill")
    table = format_comparison(ds)
    assert "ARM off" in table and "ARM layers [0]" in table and "steps: prefill" in table
    rows = [line for line in table.splitlines() if line.strip().startswith(("0 ", "1 "))]
    assert len(rows) == 2 * ds.sizes["site"]
    assert main(["compare", str(traces["base"]), str(traces["arm"]), "--steps", "prefill",
                 "--sites", "mlp.act.pre,mlp.act.post"]) == 0
    out = capsys.readouterr().out
    assert "mlp.act.post" in out and "attn.out" not in out
    for argv, msg in ((["--sites", "nope"], "site 'nope' is not recorded in both traces"),):
        assert main(["compare", str(traces["base"]), str(traces["arm"]), *argv]) == 2
        err = capsys.readouterr().err
        assert msg in err and err.count("\n") == 1
    assert main(["compare", str(traces["base"]), str(traces["base"].parent / "missing.zarr")]) == 2
    assert "no such trace directory" in capsys.readouterr().err


def test_bad_steps_is_an_error(traces):
    with pytest.raises(WorkbenchError, match="unknown step selection"):
        compare_traces(traces["base"], traces["arm"], steps="first")
