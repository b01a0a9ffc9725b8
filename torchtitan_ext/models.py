"""Model changes used by our named configs: configs of torchtitan's models swapped for ours
(SDPA attention, float32 grouped experts) and a model whose layers share one RoPE cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torchtitan.config.override import derive
from torchtitan.models.common.attention import FlexAttention, ScaledDotProductAttention
from torchtitan.models.common.moe import GroupedExperts
from torchtitan.models.llama3.model import Llama3Model


def replace_configs(model_config, config_type: type, replace) -> None:
    """In a model config tree, replace each ``config_type`` config ``c`` by ``replace(c)``,
    in place (``replace`` returns ``c`` itself to keep it)."""
    for _, _, parent, attr in list(model_config.traverse(config_type)):
        if isinstance(parent, list):
            parent[attr] = replace(parent[attr])
        else:
            setattr(parent, attr, replace(getattr(parent, attr)))


def use_sdpa_attention(model_config) -> None:
    """Replace every FlexAttention in a model config tree with causal SDPA, in place.

    torchtitan 0.3.0's language models refuse ``attn_backend="sdpa"`` ("sdpa is no longer
    supported for language models"), but FlexAttention has no CPU backward and AutoParallel
    traces SDPA, not Flex. SDPA is still a torchtitan module (Flux builds it directly), so
    we build the flavor with Flex and swap the inner attention configs. SDPA is causal over
    the whole sequence: documents packed in one sequence attend across their boundaries
    (RoPE still uses per-document positions). Idempotent.
    """
    replace_configs(
        model_config, FlexAttention.Config, lambda _: ScaledDotProductAttention.Config()
    )


class SharedRoPELlama3Model(Llama3Model):
    """Llama 3 whose layers share one RoPE cache tensor.

    Every ``layers.N.attention.rope.cache`` is the same (non-persistent) buffer, so the
    model holds one cache instead of n_layers. This is the buffer-alias case that
    deduplicating tracers lose; the model ties the cache at construction and re-ties it
    after ``init_states`` (which recomputes one cache per RoPE module).
    """

    @dataclass(kw_only=True, slots=True)
    class Config(Llama3Model.Config):
        @classmethod
        def from_llama3(cls, config: Llama3Model.Config) -> SharedRoPELlama3Model.Config:
            return derive(config, cls)

    def __init__(self, config: Config):
        super().__init__(config)
        self._share_rope_cache()

    def _share_rope_cache(self) -> None:
        ropes = [layer.attention.rope for layer in self.layers.values()]
        cache = ropes[0].cache
        for rope in ropes[1:]:
            rope.register_buffer("cache", cache, persistent=False)

    def init_states(self, *, buffer_device: torch.device | None = None) -> None:
        super().init_states(buffer_device=buffer_device)
        self._share_rope_cache()


def grouped_experts(
    x_RD: torch.Tensor,
    num_tokens_per_expert_E: torch.Tensor,
    w1_EFD: torch.Tensor,
    w2_EDF: torch.Tensor,
    w3_EFD: torch.Tensor,
    *,
    compute_dtype: torch.dtype | None,
) -> torch.Tensor:
    """torchtitan's GroupedExperts computation (SwiGLU over grouped matmuls) on plain
    tensors; ``compute_dtype`` None computes in the input's dtype, bf16 as torchtitan does."""
    offsets_E = torch.cumsum(num_tokens_per_expert_E, dim=0, dtype=torch.int32)
    dtype = compute_dtype or x_RD.dtype
    x, w1, w2, w3 = (t.to(dtype) for t in (x_RD, w1_EFD, w2_EDF, w3_EFD))
    h_RF = F.silu(torch._grouped_mm(x, w1.transpose(-2, -1), offs=offsets_E))
    h_RF = h_RF * torch._grouped_mm(x, w3.transpose(-2, -1), offs=offsets_E)
    return torch._grouped_mm(h_RF, w2.transpose(-2, -1), offs=offsets_E).type_as(x_RD)


class Float32GroupedExperts(GroupedExperts):
    """torchtitan's GroupedExperts computing in its input's dtype instead of bf16.

    torchtitan 0.3.0's GroupedExperts casts tokens and expert weights to bf16 before every
    grouped matmul, so an MoE model never trains in float32 (and its losses cannot be
    compared at 1e-5 between parallelisms). CPU ``torch._grouped_mm`` takes float32. Same
    parameters, names and initialization; only the casts are gone.
    """

    @dataclass(kw_only=True, slots=True)
    class Config(GroupedExperts.Config):
        pass

    def forward(self, x_RD: torch.Tensor, num_tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        # DTensor weights (torchtitan's EP) become local, as in GroupedExperts.forward.
        w1_EFD, w2_EDF, w3_EFD = (
            w.to_local() if isinstance(w, DTensor) else w
            for w in (self.w1_EFD, self.w2_EDF, self.w3_EFD)
        )
        return grouped_experts(
            x_RD, num_tokens_per_expert_E, w1_EFD, w2_EDF, w3_EFD, compute_dtype=None
        )


def use_float32_grouped_experts(model_config) -> None:
    """Replace every stock GroupedExperts config in a model config tree with
    Float32GroupedExperts', in place. Idempotent; leaves other expert variants alone."""

    def replace(config):
        if type(config) is not GroupedExperts.Config:
            return config
        return derive(config, Float32GroupedExperts.Config)

    replace_configs(model_config, GroupedExperts.Config, replace)
