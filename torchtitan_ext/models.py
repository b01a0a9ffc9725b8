"""Model-config adaptations of torchtitan's models used by our named configs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torchtitan.models.common.attention import FlexAttention, ScaledDotProductAttention
from torchtitan.models.llama3.model import Llama3Model


def replace_configs(model_config, config_type: type, replace) -> None:
    """In a model config tree, replace each ``config_type`` config ``c`` by ``replace(c)``,
    in place (``replace`` returns ``c`` itself to keep it)."""
    for _, _, parent, attr in list(model_config.traverse(config_type)):
        if isinstance(parent, list):
            parent[attr] = replace(parent[attr])
        else:
            setattr(parent, attr, replace(getattr(parent, attr)))


def config_values(config) -> dict:
    """A config dataclass's field values, to build a subclass config from
    (dataclasses.fields() skips Configurable's _owner ClassVar)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


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
            return cls(**config_values(config))

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
