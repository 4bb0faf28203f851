"""The model configuration a manifest stores, under Hugging Face's field names, validated once at
the edge (``from_hf``: a checkpoint's config.json or a GGUF's metadata).

Dense Llama/Mistral checkpoints are the same network as Mixtral with one always-on expert, so
``ModelConfig`` describes both: ``num_local_experts == 1`` and ``num_experts_per_tok == 1`` means
dense, and every later stage treats it as a MoE layer with a single expert of weight 1.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import CheckpointError, FormatError
from .formats import SUPPORTED_ARCHITECTURES, check_config


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    hidden_size: int  # D
    intermediate_size: int  # F
    num_hidden_layers: int  # L
    num_attention_heads: int  # H
    num_key_value_heads: int  # KVH
    head_dim: int  # HD
    vocab_size: int  # V
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    num_local_experts: int = 1  # E
    num_experts_per_tok: int = 1  # K
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    rope_scaling: dict | None = None
    extra: dict = field(default_factory=dict)

    @property
    def moe(self) -> bool:
        return self.num_local_experts > 1

    @property
    def eos_ids(self) -> tuple[int, ...]:
        e = self.eos_token_id
        if e is None:
            return ()
        return tuple(e) if isinstance(e, (list, tuple)) else (int(e),)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face config.json dict; raise CheckpointError naming what is wrong."""
        archs = hf.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in SUPPORTED_ARCHITECTURES:
            raise CheckpointError(
                f"unsupported architecture {arch or '(none given)'!s} in config.json",
                f"mixcli supports {', '.join(SUPPORTED_ARCHITECTURES)}",
            )
        try:
            d = int(hf["hidden_size"])
            h = int(hf["num_attention_heads"])
            kvh = int(hf.get("num_key_value_heads") or h)
            hd = int(hf.get("head_dim") or d // h)
            e = int(hf.get("num_local_experts", 1)) if arch == "MixtralForCausalLM" else 1
            k = int(hf.get("num_experts_per_tok", 2)) if arch == "MixtralForCausalLM" else 1
            cfg = cls(
                architecture=arch,
                hidden_size=d,
                intermediate_size=int(hf["intermediate_size"]),
                num_hidden_layers=int(hf["num_hidden_layers"]),
                num_attention_heads=h,
                num_key_value_heads=kvh,
                head_dim=hd,
                vocab_size=int(hf["vocab_size"]),
                rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
                rope_theta=float(hf.get("rope_theta", 10000.0)),
                max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
                num_local_experts=e,
                num_experts_per_tok=k,
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                bos_token_id=hf.get("bos_token_id", 1),
                eos_token_id=hf.get("eos_token_id", 2),
                rope_scaling=hf.get("rope_scaling"),
            )
        except KeyError as exc:
            raise CheckpointError(
                f"config.json lacks the field {exc.args[0]!r}", "use the config.json that came with the checkpoint"
            ) from None
        except (TypeError, ValueError) as exc:
            raise CheckpointError(
                f"config.json has an invalid value: {exc}", "use the config.json that came with the checkpoint"
            ) from None
        cfg.validate()
        return cfg

    def validate(self) -> None:
        """The rules a converted model's config must meet (``formats.check_config``, the manifest
        check's), applied to the source before any work: one definition of a valid config, and a
        config the finished model would fail is refused before the conversion, not after it."""
        try:
            check_config(self.to_dict())
        except FormatError as exc:
            raise CheckpointError(
                f"config.json is invalid: {exc.message.removeprefix('config.')}", "check the checkpoint's config.json"
            ) from None
