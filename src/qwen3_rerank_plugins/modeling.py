"""Qwen3's decoder in plain PyTorch, loaded straight from a checkpoint's safetensors.

The engine needs one thing of the model: the last hidden state of each row, with read-only
key/value caches of shared prefixes. This module computes it with the same operations, in the same
order and precision, as transformers' ``Qwen3Model`` with SDPA attention (RMSNorm in float32,
rotary angles in float32, grouped-query attention through
``torch.nn.functional.scaled_dot_product_attention``), so scores agree with the model-card code
to float tolerance (tested against transformers in tests/test_modeling.py).

Why not transformers' modelling code: importing it costs about 3.5 s on a 2-core CPU (it pulls
``torch.distributed.tensor``, ``torch._dynamo`` and ``scipy.optimize``), longer than loading a
0.6B checkpoint; the engine also needs nothing of ``generate``, hub loading hooks or the cache
classes, whose internals change between releases. Checkpoints this module does not describe
(other RoPE types, sliding-window layers, quantized weights, ``*.bin`` files) and attention
kernels other than SDPA are loaded through transformers instead (see :func:`native_support`).

Parameter names match transformers' (``layers.0.self_attn.q_proj``, ...), so int8 quantization
and ``keep_float`` patterns read the same either way.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["NativeQwen3", "Qwen3Backbone", "Qwen3Shape", "load_native", "native_support"]

logger = logging.getLogger(__name__)

_SAFETENSORS_INDEX = "model.safetensors.index.json"
_SAFETENSORS_FILE = "model.safetensors"
_torch_version = tuple(int(part) for part in torch.__version__.split(".")[:2])
#: Config keys read without a default (transformers' Qwen3Config has defaults of its own for them).
_REQUIRED_CONFIG = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
)


@dataclass(frozen=True)
class Qwen3Shape:
    """The parts of a Qwen3 ``config.json`` the decoder needs."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool = False

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Qwen3Shape:
        """Read a ``config.json`` (transformers 4.x ``rope_theta`` or 5.x ``rope_parameters``)."""
        rope = config.get("rope_parameters") or {}
        return cls(
            vocab_size=int(config["vocab_size"]),
            hidden_size=int(config["hidden_size"]),
            num_hidden_layers=int(config["num_hidden_layers"]),
            num_attention_heads=int(config["num_attention_heads"]),
            num_key_value_heads=int(config["num_key_value_heads"]),
            head_dim=int(config["head_dim"]),
            intermediate_size=int(config["intermediate_size"]),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
            max_position_embeddings=int(config.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", False)),
        )


def native_support(path: Path, config: Mapping[str, Any], attn_implementation: str | None) -> str | None:
    """Why the checkpoint at ``path`` needs transformers' modelling code, or ``None`` if it does not."""
    if attn_implementation not in (None, "sdpa"):
        return f"attn_implementation={attn_implementation!r} (this decoder uses SDPA)"
    if config.get("quantization_config"):
        return "the checkpoint is quantized"
    for key in ("rope_scaling", "rope_parameters"):  # transformers reads rope_scaling first
        rope = config.get(key) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            return f"RoPE type {rope_type!r}"
    missing = [key for key in _REQUIRED_CONFIG if config.get(key) is None]
    if missing:
        return f"config.json lacks {', '.join(missing)} (transformers' defaults would apply)"
    if config.get("use_sliding_window") or set(config.get("layer_types") or ["full_attention"]) != {
        "full_attention"
    }:
        return "sliding-window attention layers"
    if config.get("hidden_act", "silu") != "silu":
        return f"activation {config.get('hidden_act')!r}"
    if not (path / _SAFETENSORS_INDEX).is_file() and not (path / _SAFETENSORS_FILE).is_file():
        return "no model.safetensors (or its index)"
    return None


# ---------------------------------------------------------------------------------------------
# The decoder
# ---------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 and scaled in the input's dtype."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class _Projections(nn.Module):
    """A block whose :attr:`PROJECTIONS` all read the same input and may run as one layer.

    :meth:`fuse_projections` replaces them by one module over their concatenated outputs (the
    int8 path's: the shared input is quantized once and multiplied once); :meth:`project` gives
    each projection's output either way.
    """

    PROJECTIONS: tuple[str, ...] = ()

    def __init__(self) -> None:
        super().__init__()
        self.fused: nn.Module | None = None
        self.fused_sizes: list[int] = []

    def fuse_projections(self, make: Callable[[list[nn.Linear]], nn.Module]) -> None:
        """Run the projections as ``make(layers)``, whose output is theirs side by side."""
        layers = [getattr(self, name) for name in self.PROJECTIONS]
        self.fused = make(layers)
        self.fused_sizes = [layer.out_features for layer in layers]
        for name in self.PROJECTIONS:
            delattr(self, name)

    def project(self, x: torch.Tensor) -> Sequence[torch.Tensor]:
        if self.fused is None:
            return [getattr(self, name)(x) for name in self.PROJECTIONS]
        return self.fused(x).split(self.fused_sizes, dim=-1)


class MLP(_Projections):
    """SwiGLU feed-forward block."""

    PROJECTIONS = ("gate_proj", "up_proj")

    def __init__(self, shape: Qwen3Shape) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(shape.hidden_size, shape.intermediate_size, bias=False)
        self.up_proj = nn.Linear(shape.hidden_size, shape.intermediate_size, bias=False)
        self.down_proj = nn.Linear(shape.intermediate_size, shape.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.project(x)
        return self.down_proj(F.silu(gate) * up)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(_Projections):
    """Grouped-query attention with per-head RMSNorm on queries and keys, and rotary positions."""

    PROJECTIONS = ("q_proj", "k_proj", "v_proj")

    def __init__(self, shape: Qwen3Shape) -> None:
        super().__init__()
        self.head_dim = shape.head_dim
        self.groups = shape.num_attention_heads // shape.num_key_value_heads
        self.scaling = shape.head_dim**-0.5
        q_size, kv_size = (
            shape.num_attention_heads * shape.head_dim,
            shape.num_key_value_heads * shape.head_dim,
        )
        bias = shape.attention_bias
        self.q_proj = nn.Linear(shape.hidden_size, q_size, bias=bias)
        self.k_proj = nn.Linear(shape.hidden_size, kv_size, bias=bias)
        self.v_proj = nn.Linear(shape.hidden_size, kv_size, bias=bias)
        self.o_proj = nn.Linear(q_size, shape.hidden_size, bias=bias)
        self.q_norm = RMSNorm(shape.head_dim, shape.rms_norm_eps)
        self.k_norm = RMSNorm(shape.head_dim, shape.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cached: CachedPrefix | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Attention output, and this pass's own keys and values (before any cached prefix)."""
        rows, length = x.shape[:2]
        split = (rows, length, -1, self.head_dim)
        q, k, v = self.project(x)
        q = self.q_norm(q.view(split)).transpose(1, 2)
        k = self.k_norm(k.view(split)).transpose(1, 2)
        # contiguous: a fused projection's v is a view of all three outputs, which the cached
        # prefix would otherwise keep whole.
        v = v.contiguous().view(split).transpose(1, 2)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        keys, values = (k, v) if cached is None else cached.update(k, v)
        grouped = self.groups > 1
        if mask is None and (not grouped or self._sdpa_takes_groups(q.device)):
            # Causal over the pass's own tokens: SDPA's fused kernels handle the groups themselves.
            extra = {"enable_gqa": True} if grouped else {}
            out = F.scaled_dot_product_attention(
                q, keys, values, is_causal=length > 1, scale=self.scaling, **extra
            )
        else:
            if grouped:
                keys = keys.repeat_interleave(self.groups, dim=1)
                values = values.repeat_interleave(self.groups, dim=1)
            out = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, is_causal=mask is None and length > 1, scale=self.scaling
            )
        return self.o_proj(out.transpose(1, 2).reshape(rows, length, -1)), k, v

    def _sdpa_takes_groups(self, device: torch.device) -> bool:
        """Whether SDPA reads grouped keys and values itself here, where transformers lets it:
        ``enable_gqa`` exists from torch 2.5, works on MPS from 2.13, and for head sizes up to 256."""
        minimum = (2, 13) if device.type == "mps" else (2, 5)
        return _torch_version >= minimum and self.head_dim <= 256


class DecoderLayer(nn.Module):
    """Pre-norm attention and feed-forward blocks with residual connections."""

    def __init__(self, shape: Qwen3Shape) -> None:
        super().__init__()
        self.self_attn = Attention(shape)
        self.mlp = MLP(shape)
        self.input_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cached: CachedPrefix | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        attended, k, v = self.self_attn(self.input_layernorm(x), cos, sin, mask, cached)
        x = x + attended
        return x + self.mlp(self.post_attention_layernorm(x)), k, v


class CachedPrefix(Protocol):
    """How a layer's attention reads a cached prefix (``backend._PrefixLayer`` is one)."""

    def update(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached prefix's keys and values followed by ``keys`` and ``values``, per row."""
        ...


class KeyValues(NamedTuple):
    """One layer's keys and values, ``[rows, key/value heads, tokens, head_dim]``."""

    keys: torch.Tensor
    values: torch.Tensor


class BackboneOutput(NamedTuple):
    """The final hidden states, and every layer's keys and values when asked for."""

    last_hidden_state: torch.Tensor
    cache: list[KeyValues] | None


class Qwen3Backbone(nn.Module):
    """Qwen3's decoder stack (transformers' ``Qwen3Model``) for scoring: no generation, no training.

    ``forward(input_ids, cache=..., position_ids=..., attention_mask=..., use_cache=...)``:

    * without ``cache``: causal attention over ``input_ids`` (rows right-padded: under causal
      attention no real token sees a pad); with ``use_cache`` every layer's keys and values are
      returned;
    * with ``cache`` (an object with ``layers``, one per decoder layer, each with
      ``update(keys, values) -> (keys, values)`` prepending a cached prefix, and
      ``get_seq_length()``): the rows continue the prefix. Positions default to
      ``prefix length + i``; the mask defaults to causal over the prefix and the row's own tokens,
      and ``attention_mask`` (additive, ``[rows, 1, new, prefix + new]``) replaces it.
    """

    def __init__(self, shape: Qwen3Shape) -> None:
        super().__init__()
        self.shape = shape
        # Given its (uninitialised) weight: initialising it on the meta device would import
        # torch._dynamo (a second) for a table the checkpoint replaces.
        self.embed_tokens = nn.Embedding(
            shape.vocab_size, shape.hidden_size, _weight=torch.empty(shape.vocab_size, shape.hidden_size)
        )
        self.layers = nn.ModuleList(DecoderLayer(shape) for _ in range(shape.num_hidden_layers))
        self.norm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        # Rotary frequencies in float32 on the CPU, even when the rest is built on the meta device.
        dim = shape.head_dim
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
        self.register_buffer("inv_freq", 1.0 / (shape.rope_theta**exponents), persistent=False)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        cache: Any = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool = False,
    ) -> BackboneOutput:
        x = self.embed_tokens(input_ids)
        length = input_ids.shape[1]
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + length, device=x.device).unsqueeze(0)
        angles = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        mask = attention_mask
        if mask is None and past:
            keys = torch.arange(past + length, device=x.device)
            mask = (keys[None, :] <= torch.arange(past, past + length, device=x.device)[:, None])[None, None]
        kept: list[KeyValues] | None = [] if use_cache else None
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, cos, sin, mask, cache.layers[i] if cache is not None else None)
            if kept is not None:
                kept.append(KeyValues(k, v))
        return BackboneOutput(self.norm(x), kept)


class NativeQwen3:
    """A loaded checkpoint: its decoder and its LM head, shaped as the engine reads a causal LM."""

    def __init__(self, backbone: Qwen3Backbone, lm_head: torch.Tensor, name_or_path: str) -> None:
        self._backbone = backbone
        self._lm_head = nn.Linear(lm_head.shape[1], lm_head.shape[0], bias=False, device="meta")
        self._lm_head.weight = nn.Parameter(lm_head, requires_grad=False)
        self.name_or_path = name_or_path
        self.config = _ScoringConfig(backbone.shape.max_position_embeddings)

    def get_decoder(self) -> Qwen3Backbone:
        return self._backbone

    def get_output_embeddings(self) -> nn.Linear:
        return self._lm_head


@dataclass(frozen=True)
class _ScoringConfig:
    """The configuration fields the engine reads (as transformers' config names them)."""

    max_position_embeddings: int
    _attn_implementation: str = "sdpa"
    layer_types: tuple[str, ...] = ("full_attention",)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _weight_files(path: Path) -> list[Path]:
    index = path / _SAFETENSORS_INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    return [path / _SAFETENSORS_FILE]


def _tensors(files: list[Path]) -> Iterator[tuple[str, Any]]:
    from safetensors import safe_open

    for file in files:
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - a safetensors handle is not a mapping
                yield name, handle.get_tensor(name)


def load_native(
    path: Path, config: Mapping[str, Any], dtype: torch.dtype, device: torch.device
) -> NativeQwen3:
    """Load a Qwen3 causal-LM checkpoint (safetensors) into :class:`Qwen3Backbone`.

    Tensors are read one at a time, cast to ``dtype`` and moved to ``device``; the decoder is
    built on the meta device first, so no random initialisation is spent on weights about to be
    replaced. A tensor already in ``dtype`` on the CPU stays memory-mapped from its file, as
    transformers keeps it: only the pages a forward pass reads become resident (most of the
    151,669-row embedding table never does), and nothing is copied at load.

    Raises:
        ValueError: A tensor is missing, unexpected or of the wrong shape (the message names it).
    """
    shape = Qwen3Shape.from_config(config)
    with torch.device("meta"):
        backbone = Qwen3Backbone(shape)
    expected = {name: p.shape for name, p in backbone.named_parameters()}
    state: dict[str, torch.Tensor] = {}
    lm_head: torch.Tensor | None = None
    unexpected: list[str] = []
    for name, tensor in _tensors(_weight_files(path)):
        local = name.removeprefix("model.")
        if name == "lm_head.weight":
            # Kept even when the config ties it: transformers scores with a checkpoint's own head
            # when it differs from the embeddings (a fine-tune may ship one).
            lm_head = tensor.to(device=device, dtype=dtype)
            continue
        if local not in expected:
            unexpected.append(name)
            continue
        if tuple(tensor.shape) != tuple(expected[local]):
            raise ValueError(
                f"{path}: tensor {name} has shape {tuple(tensor.shape)}, the config implies "
                f"{tuple(expected[local])}"
            )
        state[local] = tensor.to(device=device, dtype=dtype)
    missing = sorted(set(expected) - set(state))
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match a Qwen3 decoder of its config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    backbone.load_state_dict(state, strict=True, assign=True)
    backbone.inv_freq = backbone.inv_freq.to(device)
    if lm_head is None:
        if not shape.tie_word_embeddings:
            raise ValueError(f"{path} has no lm_head.weight and does not tie it to the embeddings")
        lm_head = backbone.embed_tokens.weight
    elif shape.tie_word_embeddings and not torch.equal(lm_head, backbone.embed_tokens.weight):
        logger.warning(
            "%s ties its LM head to the embeddings in config.json but ships a different "
            "lm_head.weight; scoring with lm_head.weight, as transformers does",
            path,
        )
    backbone.requires_grad_(False)
    parameters = sum(p.numel() for p in backbone.parameters())
    logger.debug("Loaded %s natively: %.0fM parameters in %s", path, parameters / 1e6, dtype)
    return NativeQwen3(backbone, lm_head.detach(), str(path))
