"""Train a small byte-level model on the standard library's Python sources.

One loop for every model kind: a model maps tokens [b, t] to logits for the last k positions
[b, k, vocab] (k = t for a decoder, the latent positions for Perceiver AR), and the loss is
next-byte cross-entropy on those positions. Runs stop at a wall-clock budget (``minutes``) or a
step count (``steps``); with ``steps`` the learning-rate schedule depends on the step alone, so the
same seed and step count give the same weights.
"""
from __future__ import annotations

import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from workbench.errors import WorkbenchError
from workbench.runtime.tokenizer import ByteTokenizer
from workbench.training.corpus import VOCAB_SIZE, Corpus, WindowSampler, build_corpus, eval_windows
from workbench.training.curve import write_curve_csv, write_curve_svg

MODEL_KINDS = ("llama", "perceiver_ar")


@dataclass
class TrainConfig:
    model_kind: str = "llama"
    out: str = "data/models/llama-bytes"
    minutes: float | None = 15.0     # wall-clock budget (None: run ``steps`` steps)
    steps: int | None = None         # fixed step count; the schedule then depends on steps only
    seed: int = 0
    batch_size: int | None = None    # None: 8 windows for llama; as many predicted bytes for perceiver_ar
    seq_len: int = 512
    lr: float = 4e-3
    min_lr_ratio: float = 0.1
    warmup: float = 0.02             # fraction of the run spent warming up
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 25             # steps between small held-out evaluations for the curve
    eval_windows_small: int = 8
    eval_windows_final: int = 64
    heldout_percent: int = 5
    max_files: int | None = None     # first N stdlib files only (tests)
    repeat_share: float = 0.0        # windows that also hold a random string written twice
                                     # (corpus.WindowSampler); the shipped models use none
    threads: int = 2
    device: str = "cpu"
    progress: bool = True
    # model size (both kinds)
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4
    d_ff: int = 344
    max_seq_len: int = 512
    # Perceiver AR only
    n_latents: int = 256
    extra_model: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.model_kind not in MODEL_KINDS:
            raise WorkbenchError(f"unknown model kind {self.model_kind!r} (known: {', '.join(MODEL_KINDS)})")
        if self.minutes is None and self.steps is None:
            raise WorkbenchError("give a wall-clock budget (minutes) or a step count (steps)")
        if self.minutes is not None and not self.minutes > 0:
            raise WorkbenchError(f"the wall-clock budget must be more than 0 minutes, got {self.minutes}")
        if self.seq_len > self.max_seq_len:
            raise WorkbenchError(f"seq_len {self.seq_len} exceeds the model context {self.max_seq_len}")
        if self.batch_size is None:  # same number of predicted bytes per step for both kinds
            per_window = self.seq_len if self.model_kind == "llama" else min(self.n_latents, self.seq_len)
            self.batch_size = max(1, 8 * self.seq_len // per_window)


# --- models -------------------------------------------------------------------------------------
def build_llama(tc: TrainConfig) -> nn.Module:
    from workbench.models.config import LlamaConfig
    from workbench.models.llama import Llama
    cfg = LlamaConfig(vocab_size=VOCAB_SIZE, d_model=tc.d_model, n_layers=tc.n_layers, n_heads=tc.n_heads,
                      n_kv_heads=tc.n_kv_heads, d_ff=tc.d_ff, max_seq_len=tc.max_seq_len,
                      bos_id=256, eos_id=257, pad_id=258, **tc.extra_model)
    model = Llama(cfg)
    _gpt_init(model, cfg.n_layers)
    return model


def build_perceiver_ar(tc: TrainConfig) -> nn.Module:
    from workbench.models.perceiver import PerceiverAR, PerceiverConfig
    cfg = PerceiverConfig(model_type="perceiver_ar", vocab_size=VOCAB_SIZE, d_model=tc.d_model,
                          n_latents=tc.n_latents, n_heads=tc.n_heads, n_kv_heads=tc.n_kv_heads,
                          n_self_layers=tc.n_layers, d_ff=tc.d_ff, max_seq_len=tc.max_seq_len,
                          bos_id=256, eos_id=257, pad_id=258, **tc.extra_model)
    model = PerceiverAR(cfg)
    _gpt_init(model, cfg.n_self_layers * cfg.n_repeats + cfg.n_repeats)
    return model


BUILDERS: dict[str, Callable[[TrainConfig], nn.Module]] = {"llama": build_llama, "perceiver_ar": build_perceiver_ar}


def _gpt_init(model: nn.Module, n_layers: int) -> None:
    """GPT-2 style init: small normal weights, residual output projections scaled by depth."""
    for name, p in model.named_parameters():
        if p.dim() < 2:
            continue
        std = 0.02 / math.sqrt(2 * n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
        nn.init.normal_(p, 0.0, std)
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


def save_model(model: nn.Module, kind: str, out: Path) -> None:
    """The checkpoint layout ``session.load_model`` reads, plus the byte tokenizer's ids."""
    tok = ByteTokenizer(VOCAB_SIZE, 256, 257)
    if kind == "llama":
        from workbench.runtime.checkpoint import save_llama
        save_llama(model, out, tokenizer=tok)
    else:
        from workbench.runtime.perceiver_checkpoint import save_perceiver
        save_perceiver(model, out)
        (Path(out) / "workbench_tokenizer.json").write_text(json.dumps(tok.to_dict(), indent=2))


# --- loss and evaluation ------------------------------------------------------------------------
def next_byte_loss(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy (nats) over byte targets and their count, for windows [b, t + 1]."""
    x, y = batch[:, :-1], batch[:, 1:]
    logits = model(x)                      # [b, k, vocab], the last k positions
    y = y[:, -logits.shape[1]:]            # [b, k]
    is_byte = y < 256                      # bits per *byte*: file separators are not counted
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), reduction="none")
    return (ce * is_byte.reshape(-1)).sum(), is_byte.sum()


@torch.no_grad()
def bits_per_byte(model: nn.Module, windows: torch.Tensor, batch_size: int = 8) -> float:
    """Held-out bits per byte of ``model`` on windows [n, t + 1] (evaluated in mini-batches)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch_size):
        s, n = next_byte_loss(model, windows[i:i + batch_size].to(device))
        total, count = total + float(s), count + int(n)
    model.train(was_training)
    return total / max(count, 1) / math.log(2)


def lr_at(progress: float, tc: TrainConfig) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio * lr``; progress in [0, 1]."""
    progress = min(max(progress, 0.0), 1.0)
    if progress < tc.warmup:
        return tc.lr * max(progress / tc.warmup, 0.01)
    t = (progress - tc.warmup) / max(1.0 - tc.warmup, 1e-9)
    return tc.lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def make_optimizer(model: nn.Module, tc: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr, betas=(0.9, 0.95))


# --- the loop -----------------------------------------------------------------------------------
@dataclass
class TrainResult:
    model: nn.Module
    report: dict
    curve: list[dict]


def train(tc: TrainConfig, corpus: Corpus | None = None, log: Callable[[str], None] = print,
          on_eval: Callable[[list[dict]], None] | None = None) -> TrainResult:
    """Train one model as ``tc`` says; saves nothing (see ``train_and_save``).

    on_eval: called with the curve so far after each small held-out evaluation (live monitoring).
    """
    torch.set_num_threads(tc.threads)
    device = torch.device(tc.device)
    corpus = corpus or build_corpus(heldout_percent=tc.heldout_percent, max_files=tc.max_files)
    torch.manual_seed(tc.seed)
    model = BUILDERS[tc.model_kind](tc).to(device).train()
    opt = make_optimizer(model, tc)
    batches = WindowSampler(corpus.train, tc.seq_len, tc.batch_size, seed=tc.seed + 1,
                            repeat_share=tc.repeat_share)
    small_eval = eval_windows(corpus.heldout, tc.seq_len, tc.eval_windows_small)
    budget = tc.minutes * 60 if tc.minutes is not None else None
    n_params = sum(p.numel() for p in model.parameters())
    log(f"training {tc.model_kind}: {n_params / 1e6:.2f}M parameters, {corpus.train.size / 1e6:.1f}M train tokens "
        f"from {len(corpus.train_files)} files, batch {tc.batch_size} x {tc.seq_len}, seed {tc.seed}, "
        + (f"{tc.steps} steps" if tc.steps else f"{tc.minutes:g} minutes"))

    bar = _progress_bar(tc, budget)
    curve: list[dict] = []
    start, step, train_seconds = time.perf_counter(), 0, 0.0
    while True:
        elapsed = time.perf_counter() - start
        progress = step / tc.steps if tc.steps else elapsed / budget
        if (tc.steps and step >= tc.steps) or (budget and elapsed >= budget):
            break
        lr = lr_at(progress, tc)
        for g in opt.param_groups:
            g["lr"] = lr
        loss_sum, n = next_byte_loss(model, batches.next_batch().to(device))
        loss = loss_sum / n
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        step += 1
        row = {"step": step, "seconds": round(time.perf_counter() - start, 2), "lr": f"{lr:.3e}",
               "train_bpb": round(loss.item() / math.log(2), 4), "heldout_bpb": None}
        if step % tc.eval_every == 0:
            row["heldout_bpb"] = round(bits_per_byte(model, small_eval), 4)
        curve.append(row)
        if on_eval is not None and row["heldout_bpb"] is not None:
            on_eval(curve)
        if bar is not None:
            bar.update(step - bar.n if tc.steps else int(time.perf_counter() - start) - bar.n)
            bar.set_postfix(step=step, bpb=f"{row['train_bpb']:.3f}", lr=f"{lr:.1e}")
    train_seconds = time.perf_counter() - start
    if bar is not None:
        bar.close()

    final = bits_per_byte(model, eval_windows(corpus.heldout, tc.seq_len, tc.eval_windows_final))
    model.eval()
    report = {
        "model_kind": tc.model_kind,
        "heldout_bits_per_byte": round(final, 4),
        "unigram_bits_per_byte": round(corpus.unigram_bits_per_byte(), 4),
        "heldout_eval": {"windows": int(min(tc.eval_windows_final, (corpus.heldout.size - 1) // (tc.seq_len + 1))),
                         "window_tokens": tc.seq_len + 1},
        "steps": step,
        "seconds": round(train_seconds, 1),
        "tokens_seen": step * tc.batch_size * tc.seq_len,
        "seed": tc.seed,
        "n_params": n_params,
        "config": model.cfg.to_hf_dict() if hasattr(model.cfg, "to_hf_dict") else asdict(model.cfg),
        "train_config": {**asdict(tc), "out": project_relative(tc.out)},
        "corpus": {"stdlib_root": str(corpus.root), "train_files": len(corpus.train_files),
                   "heldout_files": len(corpus.heldout_files), "train_tokens": int(corpus.train.size),
                   "heldout_tokens": int(corpus.heldout.size)},
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    return TrainResult(model, report, curve)


def _progress_bar(tc: TrainConfig, budget: float | None):
    if not tc.progress:
        return None
    from tqdm import tqdm
    if tc.steps:
        return tqdm(total=tc.steps, unit="step", file=sys.stderr, dynamic_ncols=True)
    return tqdm(total=int(budget), unit="s", file=sys.stderr, dynamic_ncols=True)


def project_relative(path: str) -> str:
    """``path`` relative to the project root when inside it: a shipped report names no machine's paths."""
    from workbench.paths import PROJECT_ROOT
    try:
        return Path(path).resolve().relative_to(PROJECT_ROOT).as_posix()
    except ValueError:
        return str(path)


def train_and_save(tc: TrainConfig, log: Callable[[str], None] = print) -> dict:
    """Train, save the checkpoint and its side files into ``tc.out``, print the summary; returns the report."""
    out = Path(tc.out)
    corpus = build_corpus(heldout_percent=tc.heldout_percent, max_files=tc.max_files)
    out.mkdir(parents=True, exist_ok=True)
    result = train(tc, corpus, log=log, on_eval=lambda curve: write_curve_csv(curve, out / "loss_curve.csv"))
    save_model(result.model, tc.model_kind, out)
    (out / "train_files.txt").write_text(corpus.file_list_text())
    write_curve_csv(result.curve, out / "loss_curve.csv")
    write_curve_svg(result.curve, out / "loss_curve.svg",
                    f"{tc.model_kind} on stdlib sources (seed {tc.seed}): held-out "
                    f"{result.report['heldout_bits_per_byte']:.3f} bits/byte", baseline=result.report["unigram_bits_per_byte"])
    report = result.report
    (out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"saved {out}: {report['steps']} steps in {report['seconds']:.0f} s")
    log(f"held-out bits per byte: {report['heldout_bits_per_byte']:.3f} "
        f"(unigram baseline {report['unigram_bits_per_byte']:.3f})")
    try:
        from workbench.analysis import best_heads_summary, head_scores
        scores = {kind: head_scores(result.model, kind) for kind in ("previous_token", "induction")}
        report["head_scores"] = {k: np.round(v, 4).tolist() for k, v in scores.items()}
        report["best_heads"] = best_heads_summary(scores)
        (out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
        for line in _best_heads_lines(report["best_heads"]):
            log(line)
    except Exception as e:  # the checkpoint is saved; the scores can be recomputed with the analysis module
        log(f"head scores not computed: {type(e).__name__}: {e}")
    return report


def _best_heads_lines(best: dict) -> list[str]:
    return [f"best {kind.replace('_', '-')} head: layer {b['layer']} head {b['head']} score {b['score']:.3f}"
            for kind, b in best.items()]
