"""Sampler: greedy, temperature, top-k, top-p; seeded; reports what it chose among."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from workbench.errors import WorkbenchError


@dataclass
class SamplerConfig:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0            # 0: no top-k filter
    top_p: float = 1.0        # 1: no nucleus filter
    seed: int = 0
    report_k: int = 5         # candidates reported per step (the dashboard shows them)

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise WorkbenchError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise WorkbenchError(f"top-k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise WorkbenchError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.report_k < 1:
            raise WorkbenchError(f"report_k must be >= 1, got {self.report_k}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SampleResult:
    tokens: torch.Tensor      # [b] chosen token ids
    cand_ids: torch.Tensor    # [b, k] most probable candidates, best first
    cand_probs: torch.Tensor  # [b, k] their probabilities under the distribution sampled from


class Sampler:
    def __init__(self, cfg: SamplerConfig | None = None) -> None:
        self.cfg = cfg or SamplerConfig()
        self.generator = torch.Generator().manual_seed(self.cfg.seed)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution the sampler draws from, [b, vocab] (greedy: plain softmax)."""
        cfg = self.cfg
        logits = logits.float()
        if cfg.temperature > 0:
            logits = logits / cfg.temperature
        if cfg.top_k > 0 and cfg.top_k < logits.shape[-1]:
            kth = torch.topk(logits, cfg.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if cfg.top_p < 1.0:
            sorted_p, idx = torch.sort(probs, dim=-1, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            drop = (sorted_p.cumsum(-1) - sorted_p) >= cfg.top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(-1, idx, sorted_p)
            probs = probs / probs.sum(-1, keepdim=True)
        return probs

    def sample(self, logits: torch.Tensor) -> SampleResult:
        """Choose one token per row of ``logits`` [b, vocab]."""
        probs = self.probabilities(logits)
        if self.cfg.temperature == 0:
            tokens = logits.argmax(-1)
        else:
            # Draw on the CPU generator so results do not depend on the device.
            tokens = torch.multinomial(probs.cpu(), 1, generator=self.generator).squeeze(-1).to(logits.device)
        k = min(self.cfg.report_k, probs.shape[-1])
        cand_probs, cand_ids = torch.topk(probs, k, dim=-1)
        return SampleResult(tokens=tokens, cand_ids=cand_ids, cand_probs=cand_probs)
