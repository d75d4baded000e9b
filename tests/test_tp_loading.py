"""Tensor-parallel loading: each rank reads only its slices of the checkpoint (real gloo ranks).

The reference is independent of tp.py: the full TP=1 model's tensors, cut by the Megatron rule
written out here (column-parallel rows, row-parallel columns, N equal chunks in rank order).
"""
import functools
import json

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from workbench.errors import WorkbenchError
from workbench.models.config import LlamaConfig
from workbench.models.llama import Llama
from workbench.models.perceiver import PerceiverAR, PerceiverConfig
from workbench.runtime import launch, tp
from workbench.runtime.checkpoint import load_llama, save_llama
from workbench.runtime.perceiver_checkpoint import save_perceiver
from workbench.runtime.session import RunSpec, load_model, run_local
from workbench.runtime.tokenizer import ByteTokenizer

WORLD = 2
PROMPTS = ["def f(x):", "hello there"]
STEPS = 6
# Which dimension of a tensor the Megatron split cuts, by the end of its name (None: replicated).
_ROWS = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight",
         "q_proj.bias", "k_proj.bias", "v_proj.bias", "gate_proj.bias", "up_proj.bias")
_COLS = ("o_proj.weight", "down_proj.weight")
_RANK0_ONLY = ("o_proj.bias", "down_proj.bias")  # row-parallel bias: added once, by rank 0


def _llama(**kw) -> Llama:
    cfg = dict(vocab_size=260, d_model=64, n_layers=2, n_heads=8, n_kv_heads=2, d_ff=96, max_seq_len=128,
               attention_bias=True, mlp_bias=True, bos_id=256, eos_id=257)
    cfg.update(kw)
    model = Llama(LlamaConfig(**cfg))
    with torch.no_grad():  # norms and biases off their defaults, so a mix-up shows
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(0.0, 0.2)
    return model


def _split_into_two_files(path) -> None:
    """Rewrite model.safetensors as a two-file checkpoint with an HF index (layer 1 in the second file)."""
    single = path / "model.safetensors"
    with safe_open(str(single), framework="pt") as f:
        state = {k: f.get_tensor(k).clone() for k in f.keys()}
    single.unlink()
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    shards = [{k: v for k, v in state.items() if ".layers.1." not in k},
              {k: v for k, v in state.items() if ".layers.1." in k}]
    for name, shard in zip(names, shards):
        save_file(shard, str(path / name), metadata={"format": "pt"})
    weight_map = {k: names[i] for i, shard in enumerate(shards) for k in shard}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Three checkpoints: untied Llama in one file, tied Llama in two files, Perceiver AR with shared repeats."""
    root = tmp_path_factory.mktemp("tp_loading")
    torch.manual_seed(5)
    save_llama(_llama(), root / "single", tokenizer=ByteTokenizer(260, 256, 257))
    save_llama(_llama(tie_embeddings=True), root / "sharded_tied", tokenizer=ByteTokenizer(260, 256, 257))
    _split_into_two_files(root / "sharded_tied")
    save_perceiver(PerceiverAR(PerceiverConfig(d_model=32, n_latents=4, n_heads=4, n_kv_heads=2, n_self_layers=1,
                                               n_repeats=3, share_weights=True, d_ff=48, max_seq_len=64)),
                   root / "perceiver")
    return {name: str(root / name) for name in ("single", "sharded_tied", "perceiver")}


def _on_rank(checkpoints: dict, ctx: launch.RankContext):
    """Every checkpoint on this rank: the loaded shard's tensors, then a generation through the session."""
    mine = {}
    for name, path in checkpoints.items():
        model, _ = load_model(path, torch.device("cpu"), rank=ctx.rank, world=ctx.world)
        state = {k: v.detach().clone() for k, v in model.named_parameters()}
        own = all(p.untyped_storage().nbytes() == p.numel() * p.element_size()  # not a view of a whole tensor
                  for k, p in model.named_parameters() if k.endswith(_ROWS + _COLS))
        heads = {(m.n_heads, m.n_kv_heads) for m in model.modules() if hasattr(m, "n_kv_heads")}
        tied = getattr(model, "lm_head", None) is not None and model.lm_head.weight is getattr(
            model, "embed_tokens", None).weight
        spec = RunSpec(model=path, prompts=PROMPTS, max_new_tokens=STEPS, device="cpu")
        generated = run_local(spec, rank=ctx.rank, world=ctx.world, group=ctx.group).generated
        mine[name] = dict(state=state, own_memory=own, heads=heads, tied=tied, generated=generated)
    every = [None] * ctx.world
    dist.all_gather_object(every, mine, group=ctx.group)
    return every


@pytest.fixture(scope="module")
def per_rank(checkpoints):
    return launch.launch(WORLD, functools.partial(_on_rank, checkpoints))


def _full_tensors(path: str) -> dict[str, torch.Tensor]:
    model, _ = load_model(path, torch.device("cpu"))
    return {k: v.detach() for k, v in model.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["single", "sharded_tied", "perceiver"])
def test_shards_are_the_full_tensors_slices(checkpoints, per_rank, name):
    full = _full_tensors(checkpoints[name])
    ranks = [per_rank[r][name]["state"] for r in range(WORLD)]
    split = 0
    for key, t in full.items():
        if key.endswith(_ROWS) or key.endswith(_COLS):
            dim = 0 if key.endswith(_ROWS) else 1
            for r in range(WORLD):
                assert torch.equal(ranks[r][key], t.chunk(WORLD, dim=dim)[r]), (key, r)
            split += 1
        elif key.endswith(_RANK0_ONLY):
            assert torch.equal(ranks[0][key], t) and all(key not in ranks[r] for r in range(1, WORLD)), key
        else:  # replicated: embeddings, norms, LM head, latents
            assert all(torch.equal(ranks[r][key], t) for r in range(WORLD)), key
    assert split >= 7 * 2  # every layer's seven split Linears were seen
    for r in range(WORLD):
        assert set(ranks[r]) <= set(full)
        assert per_rank[r][name]["own_memory"]  # split weights hold their part only


@pytest.mark.slow
def test_head_counts_and_tied_head(per_rank):
    for r in range(WORLD):
        assert per_rank[r]["single"]["heads"] == {(8 // WORLD, 2 // WORLD)}
        assert per_rank[r]["perceiver"]["heads"] == {(4 // WORLD, 2 // WORLD)}  # every repeat's modules
        assert per_rank[r]["sharded_tied"]["tied"] and not per_rank[r]["single"]["tied"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["single", "sharded_tied", "perceiver"])
def test_tp2_generation_equals_tp1(checkpoints, per_rank, name):
    ref = run_local(RunSpec(model=checkpoints[name], prompts=PROMPTS, max_new_tokens=STEPS, device="cpu"))
    assert all(per_rank[r][name]["generated"] == ref.generated for r in range(WORLD))


def test_shard_plan_names_each_shared_perceiver_weight_once(checkpoints):
    model, _ = load_model(checkpoints["perceiver"], torch.device("cpu"))
    plan = tp.shard_plan(model, 1, WORLD)
    names = dict(model.named_parameters())
    assert set(plan) <= set(names)
    assert len(plan) == len({id(names[k]) for k in plan})  # a Linear shared between repeats: one entry
    assert plan["repeats.0.cross.o_proj.weight"] == tp.Part(1, 16, 32)


def _rewrite(src: str, dst, edit) -> None:
    """Copy a single-file Llama checkpoint to ``dst`` with ``edit(state)`` applied to its tensors."""
    dst.mkdir()
    with safe_open(f"{src}/model.safetensors", framework="pt") as f:
        state = {k: f.get_tensor(k).clone() for k in f.keys()}
    edit(state)
    save_file(state, str(dst / "model.safetensors"))
    (dst / "config.json").write_text(open(f"{src}/config.json").read())


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update({"model.layers.0.mlp.down_proj.weight": torch.zeros(64, 90)}),
     "tensor 'model.layers.0.mlp.down_proj.weight' has shape (64, 90), config implies (64, 96)"),
    (lambda s: s.pop("model.layers.1.self_attn.o_proj.bias"),  # rank 1 does not hold it, but checks it is there
     "checkpoint lacks 1 tensors, e.g. 'model.layers.1.self_attn.o_proj.bias'"),
    (lambda s: s.update({"model.extra": torch.zeros(2)}), "unexpected tensor 'model.extra' in model.safetensors"),
])
def test_bad_checkpoint_under_tp_is_a_one_line_error(checkpoints, tmp_path, edit, message):
    _rewrite(checkpoints["single"], tmp_path / "bad", edit)
    with pytest.raises(WorkbenchError) as err:
        load_llama(tmp_path / "bad", rank=1, world=WORLD)
    assert str(err.value) == message


def test_world_that_does_not_divide_is_an_error(checkpoints):
    with pytest.raises(WorkbenchError, match="cannot shard over 4 ranks: key/value heads 2 is not divisible by 4"):
        load_llama(checkpoints["single"], rank=0, world=4)
