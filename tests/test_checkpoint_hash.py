"""The checkpoint hash: the same bytes give the same hash, cached until any file is touched."""
import hashlib
import json
import os
import shutil

import pytest
import torch

from workbench.models.config import LlamaConfig
from workbench.models.llama import Llama
from workbench.runtime import checkpoint_hash as ch
from workbench.runtime.checkpoint import save_llama
from workbench.runtime.tokenizer import ByteTokenizer

CFG = dict(vocab_size=259, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64,
           bos_id=256, eos_id=None)


@pytest.fixture
def ckpt(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(tmp_path / "cache"))
    torch.manual_seed(0)
    save_llama(Llama(LlamaConfig(**CFG)), tmp_path / "m", ByteTokenizer(bos_id=256, eos_id=None))
    return tmp_path / "m"


@pytest.fixture
def hashings(monkeypatch):
    calls = []
    real = ch.hash_files

    def counted(files):
        calls.append([f.name for f in files])
        return real(files)
    monkeypatch.setattr(ch, "hash_files", counted)
    return calls


def independent_sha256(path):
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors"):
        h.update(name.encode())
        h.update((path / name).read_bytes())
    return h.hexdigest()


def test_the_hash_is_sha256_of_names_and_bytes_and_is_cached(ckpt, hashings):
    first = ch.checkpoint_hash(ckpt)
    assert first == independent_sha256(ckpt)
    assert hashings == [["config.json", "model.safetensors"]]
    assert ch.checkpoint_hash(ckpt) == first and len(hashings) == 1  # the cache answered
    assert ch.checkpoint_hash(str(ckpt) + "/") == first and len(hashings) == 1  # same directory


def test_a_changed_file_is_hashed_again_even_with_its_old_size_and_mtime(ckpt, hashings):
    first = ch.checkpoint_hash(ckpt)
    weights = ckpt / "model.safetensors"
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime set back; ctime cannot be
    second = ch.checkpoint_hash(ckpt)
    assert len(hashings) == 2 and second != first and second == independent_sha256(ckpt)


def test_a_broken_or_unwritable_cache_only_costs_a_hash(ckpt, hashings, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / ch.CACHE_FILE).write_text("{not json")
    first = ch.checkpoint_hash(ckpt)
    assert first == independent_sha256(ckpt)
    assert json.loads((cache / ch.CACHE_FILE).read_text())[str(ckpt.resolve())]["sha256"] == first  # rewritten
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(tmp_path / "a_file" / "cache"))  # cannot be created
    assert ch.checkpoint_hash(ckpt) == first
    assert ch.checkpoint_hash(ckpt) == first and len(hashings) == 3  # no cache: hashed each time


def test_deleted_checkpoints_leave_the_cache(ckpt, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(ckpt, other)
    ch.checkpoint_hash(other)
    shutil.rmtree(other)
    ch.checkpoint_hash(ckpt)
    cached = json.loads((tmp_path / "cache" / ch.CACHE_FILE).read_text())
    assert list(cached) == [str(ckpt.resolve())]
