"""torchtitan_ext: train torchtitan models through Meta's AutoParallel, aliases intact.

Modules, one concern each:
- parallelize/: the AliasAwareAutoParallel component (torchtitan's parallelize_fn), one
  module per phase of a start (its __init__ lists them)
- aliases, alias_relink: capture, restore, keep tied and verify parameters, buffers and
  modules under several names (torch only)
- patches: every adaptation of torch, torchtitan and AutoParallel, with its upstream condition
- cpu: real training on CPU with gloo, entered from the entry points
- models: model changes used by our configs (SDPA, shared RoPE cache, float32 experts)
- trainer, train, launch: the Trainer subclasses, the training entry point, run_train.sh's
  checks before any rank starts
- tied_stages: embeddings tied across pipeline stages kept one tensor in value
- dump_folder, ranks: one run per dump folder, whole-file writes; rank agreement
- assets, dataloader: the bundled tokenizer and dataset, the global-batch loader
"""

__version__ = "0.1.0"
