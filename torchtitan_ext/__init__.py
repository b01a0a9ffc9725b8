"""torchtitan_ext: train torchtitan models through Meta's AutoParallel, aliases intact.

Modules, one concern each:
- aliases: capture, restore, keep tied and verify parameters/buffers/modules under several names
- autoparallel: the AliasAwareAutoParallel component (torchtitan's parallelize_fn)
- cpu: real training on CPU with gloo, and AutoParallel's CPU gaps
- assets: the bundled tokenizer and dataset
- models: model-config adaptations used by our configs (SDPA, shared RoPE cache)
- trainer: Trainer subclasses that wire the above into torchtitan
"""

__version__ = "0.1.0"
