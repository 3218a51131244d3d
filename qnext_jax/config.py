"""Qwen3-Next model configuration: a frozen dataclass built from the checkpoint's config.json.

Runtime choices (dtypes, kernel implementation, mesh, cache length) live in `RuntimeOptions`,
never in the model config.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Literal

LINEAR, FULL = "linear_attention", "full_attention"


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """YaRN (or linear / dynamic-free default) scaling of the rotary frequencies."""

    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None


@dataclasses.dataclass(frozen=True)
class Qwen3NextConfig:
    vocab_size: int = 151936
    hidden_size: int = 2048
    intermediate_size: int = 5120
    num_hidden_layers: int = 48
    layer_types: tuple[str, ...] = ()
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: int = 256
    partial_rotary_factor: float = 0.25
    rope_theta: float = 10_000_000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 262144
    rms_norm_eps: float = 1e-6
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_conv_kernel_dim: int = 4
    num_experts: int = 512
    num_experts_per_tok: int = 10
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    num_mtp_layers: int = 1
    bos_token_id: int | None = 151643
    eos_token_id: int | tuple[int, ...] | None = 151645
    pad_token_id: int | None = None
    torch_dtype: str = "bfloat16"

    def __post_init__(self):
        if not self.layer_types:
            object.__setattr__(self, "layer_types", default_layer_types(self.num_hidden_layers, 4))
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "mlp_only_layers", tuple(self.mlp_only_layers))
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def linear_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.linear_key_dim + self.linear_value_dim

    def is_moe_layer(self, i: int) -> bool:
        """HF rule: MoE iff not in mlp_only_layers, experts exist, and
        (i + 1) % decoder_sparse_step == 0."""
        return (
            i not in self.mlp_only_layers
            and self.num_experts > 0
            and (i + 1) % self.decoder_sparse_step == 0
        )

    def layer_kinds(self) -> tuple[tuple[str, bool], ...]:
        """(layer type, is MoE) per layer: the unit that layer stacking groups on."""
        return tuple((t, self.is_moe_layer(i)) for i, t in enumerate(self.layer_types))

    # ---- validation ----------------------------------------------------------------------
    def validate(self) -> None:
        positive = (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "linear_num_key_heads",
            "linear_num_value_heads",
            "linear_key_head_dim",
            "linear_value_head_dim",
            "linear_conv_kernel_dim",
            "max_position_embeddings",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"config.{name} must be a positive integer, got {value!r}")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(
                f"config.layer_types has {len(self.layer_types)} entries but num_hidden_layers is "
                f"{self.num_hidden_layers}"
            )
        bad = sorted({t for t in self.layer_types if t not in (LINEAR, FULL)})
        if bad:
            raise ValueError(f"config.layer_types has {bad}; allowed: {LINEAR!r}, {FULL!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"config.num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ValueError(
                f"config.linear_num_value_heads={self.linear_num_value_heads} must be a multiple "
                f"of linear_num_key_heads={self.linear_num_key_heads}"
            )
        if not 0 < self.partial_rotary_factor <= 1 or self.rotary_dim % 2:
            raise ValueError(
                f"config.partial_rotary_factor={self.partial_rotary_factor} must be in (0, 1] and "
                f"give an even rotary dim (head_dim={self.head_dim} -> {self.rotary_dim})"
            )
        if self.num_experts < 0 or (
            self.num_experts and not 0 < self.num_experts_per_tok <= self.num_experts
        ):
            raise ValueError(
                f"config.num_experts_per_tok={self.num_experts_per_tok} must be in "
                f"[1, num_experts={self.num_experts}]"
            )
        if self.num_experts and self.moe_intermediate_size <= 0:
            raise ValueError(
                f"config.moe_intermediate_size must be > 0, got {self.moe_intermediate_size}"
            )
        if any(not self.is_moe_layer(i) for i in range(self.num_hidden_layers)) and (
            self.intermediate_size <= 0
        ):
            raise ValueError(
                f"config.intermediate_size={self.intermediate_size} must be > 0: some layers are "
                "dense MLP (mlp_only_layers / decoder_sparse_step)"
            )
        if self.hidden_act != "silu":
            raise ValueError(
                f"config.hidden_act={self.hidden_act!r} is not supported; allowed: 'silu'"
            )
        if self.num_mtp_layers < 0:
            raise ValueError(f"config.num_mtp_layers must be >= 0, got {self.num_mtp_layers}")
        if self.rope_scaling is not None and self.rope_scaling.rope_type not in (
            "default",
            "yarn",
            "linear",
        ):
            raise ValueError(
                f"config.rope_scaling.rope_type={self.rope_scaling.rope_type!r} is not supported; "
                "allowed: 'default', 'linear', 'yarn'"
            )

    # ---- HF interop ----------------------------------------------------------------------
    @classmethod
    def from_hf(cls, source: str | Path | dict[str, Any], **overrides) -> Qwen3NextConfig:
        """Build from an HF config.json (a dict, the file, or the checkpoint directory)."""
        if not isinstance(source, dict):
            path = Path(source)
            path = path / "config.json" if path.is_dir() else path
            source = json.loads(path.read_text())
        hf = dict(source)
        if hf.get("model_type") != "qwen3_next":
            raise ValueError(
                f"config.model_type={hf.get('model_type')!r} is not supported; "
                "allowed: 'qwen3_next'"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in hf.items() if k in fields}
        n_layers = hf.get("num_hidden_layers", cls.num_hidden_layers)
        if not hf.get("layer_types"):
            kw["layer_types"] = default_layer_types(n_layers, hf.get("full_attention_interval", 4))
        # transformers v5 folds rope_theta / rope_scaling / partial_rotary_factor into
        # rope_parameters
        rope = dict(hf.get("rope_parameters") or {})
        scaling = hf.get("rope_scaling") or (
            rope if rope.get("rope_type", "default") != "default" else None
        )
        if "rope_theta" not in hf and "rope_theta" in rope:
            kw["rope_theta"] = rope["rope_theta"]
        if "partial_rotary_factor" not in hf and "partial_rotary_factor" in rope:
            kw["partial_rotary_factor"] = rope["partial_rotary_factor"]
        kw["rope_scaling"] = _rope_scaling(scaling)
        if "num_mtp_layers" not in overrides:
            kw["num_mtp_layers"] = hf.get(
                "num_nextn_predict_layers", hf.get("mtp_num_hidden_layers", 1)
            )
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = tuple(kw["eos_token_id"])
        kw.update(overrides)
        return cls(**kw)

    def to_hf(self) -> dict[str, Any]:
        """The config.json dict transformers reads (rope_scaling in the legacy form)."""
        d = dataclasses.asdict(self)
        d.pop("num_mtp_layers")
        d["layer_types"] = list(self.layer_types)
        d["mlp_only_layers"] = list(self.mlp_only_layers)
        if isinstance(self.eos_token_id, tuple):
            d["eos_token_id"] = list(self.eos_token_id)
        d["rope_scaling"] = (
            None
            if self.rope_scaling is None
            else {k: v for k, v in dataclasses.asdict(self.rope_scaling).items() if v is not None}
        )
        d.update(
            model_type="qwen3_next",
            architectures=["Qwen3NextForCausalLM"],
            num_nextn_predict_layers=self.num_mtp_layers,
            attention_bias=False,
            attention_dropout=0.0,
        )
        return d

    def replace(self, **changes) -> Qwen3NextConfig:
        return dataclasses.replace(self, **changes)


def default_layer_types(num_layers: int, full_attention_interval: int) -> tuple[str, ...]:
    """HF's rule: layer i is full attention iff (i + 1) % interval == 0."""
    if not isinstance(full_attention_interval, int) or full_attention_interval < 1:
        raise ValueError(
            "config.full_attention_interval must be a positive integer, "
            f"got {full_attention_interval!r}"
        )
    return tuple(LINEAR if (i + 1) % full_attention_interval else FULL for i in range(num_layers))


def _rope_scaling(d: dict[str, Any] | None) -> RopeScaling | None:
    if not d:
        return None
    rope_type = d.get("rope_type", d.get("type", "default"))
    if rope_type == "default":
        return None
    known = {f.name for f in dataclasses.fields(RopeScaling)}
    kw = {k: v for k, v in d.items() if k in known}
    kw["rope_type"] = rope_type
    factor = kw.get("factor", 1.0)
    if not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor < 1:
        raise ValueError(f"config.rope_scaling.factor must be a finite number >= 1, got {factor!r}")
    return RopeScaling(**kw)


# ---- presets ------------------------------------------------------------------------------
QWEN3_NEXT_80B_A3B = Qwen3NextConfig()


def tiny_config(**overrides) -> Qwen3NextConfig:
    """A few-MB Qwen3-Next with every architectural part (3:1 pattern, MoE + shared expert, MTP)."""
    base = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        rope_theta=10000.0,
        max_position_embeddings=2048,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        bos_token_id=None,
        eos_token_id=None,
    )
    base.update(overrides)
    return Qwen3NextConfig(**base)


PRESETS = {"qwen3-next-80b-a3b": lambda: QWEN3_NEXT_80B_A3B, "tiny": tiny_config}


@dataclasses.dataclass(frozen=True)
class RuntimeOptions:
    """How to run a model (not what the model is)."""

    dtype: str = "bfloat16"  # parameter and activation dtype
    gdn_impl: Literal["auto", "pallas", "chunked", "recurrent"] = "auto"
    attention_impl: Literal["auto", "dense", "blockwise", "cudnn", "pallas"] = "auto"
    moe_impl: Literal["auto", "pallas", "gather", "grouped", "ragged", "dense"] = "auto"
    # projections of decode-sized batches: "auto" = the Pallas kernel on the GPU (ops.linear)
    linear_impl: Literal["auto", "pallas", "xla"] = "auto"
    # with the kernel: projections that share their input (GDN's qkvz and ba; attention's q, k,
    # v) in one launch (ops.linear_many)
    merge_projections: bool = True
    # the norms (residual add folded in; GDN's output norm) at decode sizes: "auto" = the Pallas
    # kernels on the GPU. "xla" by default: the kernels measured neutral (README: Norms).
    norm_impl: Literal["auto", "pallas", "xla"] = "xla"
    chunk_size: int = 64
    scan_layers: bool = True
    mesh: Any = None  # jax.sharding.Mesh for tensor / expert parallelism (qnext_jax.sharding)
