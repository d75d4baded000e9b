"""One sequence's text as a trace recorded it: its real prompt, then its generated tokens, each
with its absolute position, id, text, the step that produced it and the probability the sampler
gave it; read incrementally as steps are committed. The views, the Compare tab and
``workbench.compare`` share it (no Panel here).
"""
from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

import numpy as np


@dataclass
class TokenText:
    """The text of one sequence as shown: its real prompt, then its generated tokens, each kept with
    its absolute position. Padding (prefill positions past the real prompt of a shorter sequence in
    a right-padded batch) is left out, so list indices and positions may differ: map with
    ``positions`` / ``index_of``, never assume index == position."""

    seq: int
    n_prompt: int = 0            # positions the prefill processed (the padded prompt length)
    prompt_len: int = 0          # real prompt tokens: positions [0, prompt_len), the first shown
    positions: list[int] = field(default_factory=list)  # absolute position of each shown token
    texts: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    produced: list[int] = field(default_factory=list)  # step that produced each shown token
    # probability the sampler gave each shown token: None for the prompt, NaN where the token was
    # not among the recorded candidates (or the sampler was not recorded)
    probs: list = field(default_factory=list)
    read_to: int = 0             # store positions read so far (padding included)
    vocab: dict[int, str] = field(default_factory=dict)  # id -> text, of the text and of `token_labels`

    def index_of(self, position: int) -> int:
        """Index of the token at absolute ``position`` in the shown lists (-1 if not shown)."""
        i = bisect_left(self.positions, position)
        return i if i < len(self.positions) and self.positions[i] == position else -1

    def text_at(self, position: int) -> str | None:
        """Text of the token at absolute ``position`` (None for padding or positions not read)."""
        i = self.index_of(position)
        return self.texts[i] if i >= 0 else None

    def positions_before(self, stop: int) -> np.ndarray:
        """Absolute positions of the shown tokens before ``stop`` (the rows/keys a map should show)."""
        return np.asarray(self.positions[:bisect_left(self.positions, stop)], dtype=np.int64)

    def visible(self, step: int) -> int:
        """Shown tokens that exist once ``step`` is done (prompt plus tokens produced by steps <= step)."""
        produced = np.asarray(self.produced)
        return int(np.count_nonzero((produced >= 0) & (produced <= step)))

    def step_of(self, position: int) -> int:
        """Step to select when ``position`` is clicked: the one that produced it (0 for the prompt)."""
        i = self.index_of(position)
        if i < self.prompt_len:  # the prompt, or a position that is not shown
            return 0
        return max(int(self.produced[i]), 0)

    def position_of(self, step: int) -> int:
        """Absolute position of the token produced at ``step`` (-1 if none)."""
        for i in range(self.prompt_len, len(self.produced)):
            if self.produced[i] == step:
                return self.positions[i]
        return -1

    @property
    def n_generated(self) -> int:
        return max(len(self.texts) - self.prompt_len, 0)


def token_labels(trace, ids, known: TokenText | None = None) -> list[str]:
    """Display text of each token id in ``ids``: from a text that holds the id (``known``), else
    from the trace's vocabulary table (``tokens/vocab_text``, read for the missing ids only and
    kept in ``known``), else ``#id`` (traces recorded before the table existed)."""
    ids = [int(i) for i in ids]
    vocab = known.vocab if known is not None else {}
    ds = trace.tokens
    missing = sorted({i for i in ids if i not in vocab})
    if missing and "vocab_text" in ds.data_vars:
        inside = [i for i in missing if 0 <= i < ds.sizes["vocab"]]
        texts = ds["vocab_text"].isel(vocab=inside).values if inside else []
        vocab.update((i, str(t)) for i, t in zip(inside, texts) if t)  # "": not written yet
    return [vocab.get(i, f"#{i}") for i in ids]


class SequenceText:
    """A view's TokenText of the selected sequence, read incrementally as steps are committed
    (another trace or sequence starts over)."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._text: TokenText | None = None

    def read(self, trace, seq: int) -> TokenText:
        key = (id(trace), seq)
        self._text = read_token_text(trace, seq, self._text if key == self._key else None)
        self._key = key
        return self._text


def read_token_text(trace, seq: int, known: TokenText | None = None) -> TokenText:
    """Token text of ``seq`` up to the committed step; with ``known``, read only new positions.

    Positions in [prompt_len, n_prompt) that the prefill wrote (produced step 0) are padding and are
    skipped; a trace whose runtime keeps each sequence's own positions has n_prompt == prompt_len.
    """
    ds = trace.tokens
    n_steps = int(trace.n_steps)
    if known is None or known.seq != seq:
        known = TokenText(seq=seq)
    if n_steps == 0:
        return known
    if known.n_prompt == 0:  # first read after the prefill was committed
        known.n_prompt = int(ds["query_stop"][seq, 0].values)
        prompt_len = int(ds["prompt_len"][seq].values)
        known.prompt_len = prompt_len if 0 <= prompt_len <= known.n_prompt else known.n_prompt
    # The reader cuts `position` at the last position produced by a committed step.
    stop = int(ds.sizes["position"])
    start = known.read_to
    if stop <= start:
        return known
    produced = np.asarray(ds["produced_step"][seq, start:stop].values)
    ids = np.asarray(ds["token_id"][seq, start:stop].values)
    texts = [str(t) for t in ds["text"][seq, start:stop].values]
    written = int(np.count_nonzero(produced >= 0)) if produced.size else 0
    # Keep a contiguous written prefix (a position is written once, in order).
    n = written if written == len(produced) or produced.size == 0 else int(np.argmin(produced >= 0))
    first_step = int(produced[:n].min()) if n else 0
    chosen_prob = (np.asarray(ds["chosen_prob"][seq, first_step:int(produced[:n].max()) + 1].values, dtype=np.float64)
                   if n else np.zeros(0))
    for k in range(n):
        position = start + k
        if known.prompt_len <= position < known.n_prompt and produced[k] == 0:
            continue  # padding of a shorter prompt: not part of this sequence's text
        known.positions.append(position)
        known.produced.append(int(produced[k]))
        known.probs.append(None if position < known.prompt_len else float(chosen_prob[produced[k] - first_step]))
        known.ids.append(int(ids[k]))
        known.texts.append(texts[k])
        known.vocab.setdefault(int(ids[k]), texts[k])
    known.read_to = start + n
    return known
