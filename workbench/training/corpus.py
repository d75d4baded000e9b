"""Training corpus: the Python standard library's own source files, read as bytes.

Every machine with Python has them, so the default models train without downloading anything.
The split into train and held-out files is by a hash of each file's path relative to the stdlib
root, so it is the same on every machine (the file contents differ between Python versions; the
list of files used is written next to the checkpoint).
"""
from __future__ import annotations

import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from workbench.errors import WorkbenchError

BOS_ID = 256     # ByteTokenizer: ids 0-255 are bytes, 256 bos, 257 eos, 258 pad
VOCAB_SIZE = 259
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "__pycache__", "idle_test"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Sorted *.py files of the standard library, without tests and installed packages."""
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise WorkbenchError(f"standard library directory {root} does not exist")
    files = [f for f in root.rglob("*.py")
             if f.is_file() and not (SKIP_DIRS & set(f.relative_to(root).parts[:-1]))]
    if not files:
        raise WorkbenchError(f"no *.py files under {root}")
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def is_held_out(rel_path: str, percent: int = 5) -> bool:
    """Deterministic split by file: crc32 of the relative path (same on every machine and run)."""
    return zlib.crc32(rel_path.encode()) % 100 < percent


@dataclass
class Corpus:
    """Two token streams: every file as ``[bos] + its bytes``, concatenated."""

    root: Path
    train_files: list[str]
    heldout_files: list[str]
    train: np.ndarray    # [n_train_tokens] uint16
    heldout: np.ndarray  # [n_heldout_tokens] uint16

    def file_list_text(self) -> str:
        lines = [f"# stdlib root: {self.root}", f"# {len(self.train_files)} train files, "
                 f"{len(self.heldout_files)} held-out files ({self.train.size} / {self.heldout.size} tokens)"]
        lines += [f"train\t{f}" for f in self.train_files] + [f"heldout\t{f}" for f in self.heldout_files]
        return "\n".join(lines) + "\n"

    def unigram_bits_per_byte(self) -> float:
        """Cross-entropy of the held-out bytes under the train bytes' frequencies (add-one smoothed)."""
        train = self.train[self.train < 256]
        heldout = self.heldout[self.heldout < 256]
        counts = np.bincount(train, minlength=256).astype(np.float64) + 1.0
        logp = np.log2(counts / counts.sum())
        return float(-logp[heldout].mean())


def _stream(root: Path, rels: list[str]) -> np.ndarray:
    parts = []
    for rel in rels:
        data = (root / rel).read_bytes()
        parts.append(np.array([BOS_ID], dtype=np.uint16))
        parts.append(np.frombuffer(data, dtype=np.uint8).astype(np.uint16))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def build_corpus(root: Path | None = None, heldout_percent: int = 5, max_files: int | None = None) -> Corpus:
    """Read the stdlib sources into train and held-out streams.

    max_files: keep only the first N files of the sorted list (small corpora for tests).
    """
    root = Path(root) if root is not None else stdlib_root()
    rels = [f.relative_to(root).as_posix() for f in stdlib_files(root)]
    if max_files is not None:
        rels = rels[:max_files]
    heldout = [r for r in rels if is_held_out(r, heldout_percent)]
    train = [r for r in rels if not is_held_out(r, heldout_percent)]
    if not train or not heldout:
        raise WorkbenchError(f"corpus split left {len(train)} train and {len(heldout)} held-out files; need both")
    return Corpus(root, train, heldout, _stream(root, train), _stream(root, heldout))


class WindowSampler:
    """Random windows of ``seq_len + 1`` tokens from a stream, from a seeded generator (reproducible).

    repeat_share: the share of windows that also carry a string of random printable bytes written
    twice (16-128 bytes, the second copy later in the window). Predicting the second copy takes an
    induction head (attend to the byte after the earlier occurrence of the current byte), and such
    repeats are the usual way to make one form early. In a 40-minute run of the default Llama model
    (30 % of windows) none formed, and greedy text got worse: the shipped models train without
    them (docs/default-models.md).
    """

    min_repeat, max_repeat = 16, 128

    def __init__(self, stream: np.ndarray, seq_len: int, batch_size: int, seed: int,
                 repeat_share: float = 0.0) -> None:
        if stream.size < seq_len + 2:
            raise WorkbenchError(f"corpus of {stream.size} tokens is shorter than one window of {seq_len + 1}")
        if not 0.0 <= repeat_share <= 1.0:
            raise WorkbenchError(f"repeat share must be between 0 and 1, got {repeat_share}")
        if repeat_share and seq_len + 1 < 2 * self.min_repeat:
            raise WorkbenchError(f"windows of {seq_len + 1} tokens are too short for repeats of {self.min_repeat}")
        self.data = torch.from_numpy(stream.astype(np.int64))
        self.seq_len, self.batch_size, self.repeat_share = seq_len, batch_size, repeat_share
        self.gen = torch.Generator().manual_seed(seed)

    def next_batch(self) -> torch.Tensor:
        starts = torch.randint(0, self.data.numel() - self.seq_len - 1, (self.batch_size,), generator=self.gen)
        idx = starts[:, None] + torch.arange(self.seq_len + 1)
        batch = self.data[idx]  # [batch, seq_len + 1]
        if self.repeat_share:
            chosen = torch.rand(self.batch_size, generator=self.gen) < self.repeat_share
            for i in chosen.nonzero().flatten().tolist():
                self._write_repeat(batch[i])  # a view: writes into the batch
        return batch

    def _write_repeat(self, row: torch.Tensor) -> None:
        n = row.numel()
        m = self._randint(self.min_repeat, min(self.max_repeat, n // 2) + 1)
        first = self._randint(0, n - 2 * m + 1)
        second = self._randint(first + m, n - m + 1)
        text = torch.randint(32, 127, (m,), generator=self.gen)
        row[first:first + m] = text
        row[second:second + m] = text

    def _randint(self, low: int, high: int) -> int:
        return int(torch.randint(low, high, (1,), generator=self.gen))


def eval_windows(stream: np.ndarray, seq_len: int, n_windows: int) -> torch.Tensor:
    """Evenly spaced, non-overlapping windows of ``seq_len + 1`` tokens (the same on every call)."""
    n_fit = (stream.size - 1) // (seq_len + 1)
    if n_fit < 1:
        raise WorkbenchError(f"held-out stream of {stream.size} tokens is shorter than one window")
    n = min(n_windows, n_fit)
    starts = np.linspace(0, (n_fit - 1) * (seq_len + 1), n).astype(np.int64)
    data = torch.from_numpy(stream.astype(np.int64))
    return data[torch.from_numpy(starts)[:, None] + torch.arange(seq_len + 1)]
