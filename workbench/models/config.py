"""Model configuration: one dataclass that maps to and from a Hugging Face Llama config.json."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from workbench.errors import WorkbenchError

SUPPORTED_ACTS = ("silu", "gelu", "gelu_pytorch_tanh")
SUPPORTED_ROPE = ("default", "llama3")


class ConfigError(WorkbenchError):
    """A config.json that workbench cannot run; the message names the problem."""


@dataclass
class LlamaConfig:
    vocab_size: int = 260
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4
    d_ff: int = 688
    head_dim: int = 0  # 0: d_model // n_heads
    max_seq_len: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF rope_parameters beyond the default (llama3 supported)
    act: str = "silu"
    tie_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_id: int | None = None
    eos_id: int | list[int] | None = None
    pad_id: int | None = None
    torch_dtype: str = "float32"
    extra: dict = field(default_factory=dict)  # HF keys we do not interpret, kept on save

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            if self.d_model % self.n_heads:
                raise ConfigError(f"hidden_size {self.d_model} is not divisible by num_attention_heads {self.n_heads}")
            self.head_dim = self.d_model // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"num_attention_heads {self.n_heads} is not a multiple of num_key_value_heads {self.n_kv_heads}")
        if self.act not in SUPPORTED_ACTS:
            raise ConfigError(f"unsupported hidden_act {self.act!r} (supported: {', '.join(SUPPORTED_ACTS)})")
        rope_type = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type", "default"))
        if rope_type not in SUPPORTED_ROPE:
            raise ConfigError(f"unsupported rope type {rope_type!r} (supported: {', '.join(SUPPORTED_ROPE)})")

    @property
    def n_rep(self) -> int:
        return self.n_heads // self.n_kv_heads

    @property
    def eos_ids(self) -> list[int]:
        if self.eos_id is None:
            return []
        return list(self.eos_id) if isinstance(self.eos_id, (list, tuple)) else [self.eos_id]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # --- Hugging Face config.json ---------------------------------------------------------------
    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> "LlamaConfig":
        archs = hf.get("architectures") or []
        model_type = hf.get("model_type")
        if model_type not in (None, "llama") or (archs and archs[0] != "LlamaForCausalLM"):
            raise ConfigError(f"unsupported architecture {archs[0] if archs else model_type!r}: only LlamaForCausalLM")
        try:
            n_heads = int(hf["num_attention_heads"])
            # transformers 5 keeps rope settings in rope_parameters; 4.x in rope_theta/rope_scaling.
            rope = dict(hf.get("rope_parameters") or {})
            theta = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
            scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
            known = {"vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                     "intermediate_size", "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta",
                     "rope_scaling", "rope_parameters", "hidden_act", "tie_word_embeddings", "attention_bias",
                     "mlp_bias", "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype",
                     "architectures", "model_type"}
            return cls(
                vocab_size=int(hf["vocab_size"]),
                d_model=int(hf["hidden_size"]),
                n_layers=int(hf["num_hidden_layers"]),
                n_heads=n_heads,
                n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
                d_ff=int(hf["intermediate_size"]),
                head_dim=int(hf.get("head_dim") or 0),
                max_seq_len=int(hf.get("max_position_embeddings", 2048)),
                norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                rope_scaling=scaling,
                act=hf.get("hidden_act", "silu"),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                attention_bias=bool(hf.get("attention_bias", False)),
                mlp_bias=bool(hf.get("mlp_bias", False)),
                bos_id=hf.get("bos_token_id"),
                eos_id=hf.get("eos_token_id"),
                pad_id=hf.get("pad_token_id"),
                torch_dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "float32"),
                extra={k: v for k, v in hf.items() if k not in known},
            )
        except KeyError as e:
            raise ConfigError(f"config.json lacks required key {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"config.json has a bad value: {e}") from None

    def to_hf_dict(self) -> dict[str, Any]:
        out = dict(self.extra)
        out.update({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.d_model,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "intermediate_size": self.d_ff,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_seq_len,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "hidden_act": self.act,
            "tie_word_embeddings": self.tie_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "bos_token_id": self.bos_id,
            "eos_token_id": self.eos_id,
            "pad_token_id": self.pad_id,
            "torch_dtype": self.torch_dtype,
        })
        return out

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in fields(cls)}
