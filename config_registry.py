"""Named training configs of torchtitan_ext.

torchtitan's own entry point finds them from the repository root:

    python -m torchtitan.train --module config_registry --config llama3_debugmodel_autoparallel

and so does ./run_train.sh (CONFIG=...). Each config derives from torchtitan's own config
function and changes only what it names. Debug configs read the bundled tokenizer and
dataset (torchtitan_ext/assets.py); the large configs keep torchtitan's asset paths and fall
back to the bundled ones when those are missing. Without an accelerator every config is
adapted for CPU (torchtitan_ext/cpu.py).
"""

from __future__ import annotations

from torchtitan.components.loss import CrossEntropyLoss
from torchtitan.config import CompileConfig
from torchtitan.config.override import derive
from torchtitan.models.common.config_utils import decoder_vocab_size
from torchtitan.models.deepseek_v3.config_registry import deepseek_v3_16b, deepseek_v3_debugmodel
from torchtitan.models.llama3 import model_registry as llama3_model
from torchtitan.models.llama3.config_registry import llama3_8b, llama3_debugmodel
from torchtitan.models.qwen3.config_registry import qwen3_0_6b, qwen3_30b_a3b, qwen3_moe_debug

from torchtitan_ext import cpu
from torchtitan_ext.assets import bundled_assets, use_bundled_assets_if_missing
from torchtitan_ext.dataloader import GlobalBatchTextDataLoader
from torchtitan_ext.models import SharedRoPELlama3Model, use_sdpa_attention
from torchtitan_ext.trainer import AutoParallelTrainer, Trainer


def _debug(config, config_cls):
    """Our debug configs: bundled assets, batches independent of the data-parallel degree
    (runs on 1 and 2 ranks see the same global batches), CPU-sized steps, and the CPU
    adaptations when there is no accelerator."""
    config = derive(config, config_cls)
    assets = bundled_assets()  # built by the Trainer
    config.hf_assets_path = assets.tokenizer_path
    config.dataloader = GlobalBatchTextDataLoader.Config(
        dataset="c4_test", dataset_path=assets.dataset_path
    )
    # 8 x 256 tokens a step: about a second a step on 2 CPU cores.
    config.training.seq_len = 256
    config.training.steps = 20
    cpu.adapt_config(config)
    return config


def _for_autoparallel(config):
    """What AutoParallel needs from a torchtitan config, applied to torchtitan's config before
    it becomes ours: SDPA attention (AutoParallel traces SDPA, not FlexAttention), plain
    cross-entropy (the chunked loss applies lm_head outside the model graph), and no
    torchtitan activation-checkpoint wrappers (AutoParallel traces the model whole)."""
    use_sdpa_attention(config.model_spec.model)
    config.loss = CrossEntropyLoss.Config(global_vocab_size=decoder_vocab_size(config.model_spec))
    config.activation_checkpoint = None
    # On GPUs torchtitan 0.3.0 captures each forward+backward in a CUDA graph by default. The
    # expert-parallel region reads its token counts on the host to size the all_to_all, which
    # a CUDA graph cannot hold (torchtitan refuses such EP configs when it parses them), and
    # AutoParallel's module has not been verified under capture: off for every AutoParallel
    # config (--training.no-disable-cuda-graphs to try it on dense models).
    config.training.disable_cuda_graphs = True
    return config


def _large(config):
    """A large config trained through AutoParallel, compiled (Inductor on AutoParallel's
    graphs: bucketed collectives overlapped with compute; benchmarks/README.md compares it
    with eager on the debug models). --compile.no-enable turns it off."""
    config = derive(_for_autoparallel(config), AutoParallelTrainer.Config)
    config.compile = CompileConfig(enable=True, components=["model"])
    use_bundled_assets_if_missing(config)
    cpu.adapt_config(config)
    return config


def llama3_debugmodel_cpu() -> Trainer.Config:
    """torchtitan's llama3 debug model with torchtitan's own parallelization (FSDP),
    trainable on CPU: proves the CPU path independently of AutoParallel."""
    return _debug(llama3_debugmodel(), Trainer.Config)


def llama3_debugmodel_autoparallel() -> AutoParallelTrainer.Config:
    """torchtitan's llama3 debug model parallelized by AutoParallel, with tied embeddings
    (as in Llama 3.2 1B/3B) so the parameter-alias path runs in every run."""
    config = _debug(_for_autoparallel(llama3_debugmodel()), AutoParallelTrainer.Config)
    config.model_spec.model.enable_weight_tying = True
    return config


def llama3_debugmodel_untied_autoparallel() -> AutoParallelTrainer.Config:
    """The AutoParallel debug config with untied embeddings: what pipeline parallelism
    (--parallelism.pipeline_parallel_degree) runs today, since torchtitan 0.3.0 refuses
    weight tying with it."""
    config = llama3_debugmodel_autoparallel()
    config.model_spec.model.enable_weight_tying = False
    return config


def llama3_debugmodel_shared_rope_autoparallel() -> AutoParallelTrainer.Config:
    """The AutoParallel debug config whose layers share one RoPE cache buffer (one tensor
    under every layers.N.attention.rope.cache), so the buffer-alias path runs end to end."""
    config = llama3_debugmodel_autoparallel()
    config.model_spec.model = SharedRoPELlama3Model.Config.from_llama3(config.model_spec.model)
    return config


def llama3_1b_autoparallel() -> AutoParallelTrainer.Config:
    """Llama 3.2 1B (tied embeddings) through AutoParallel. torchtitan 0.3.0 has no 1B config
    function, so this is torchtitan's llama3_8b recipe with its "1B" model flavor."""
    config = llama3_8b()
    config.model_spec = llama3_model("1B")
    return _large(config)


def llama3_8b_autoparallel() -> AutoParallelTrainer.Config:
    """torchtitan's llama3_8b through AutoParallel."""
    return _large(llama3_8b())


def qwen3_0_6b_autoparallel() -> AutoParallelTrainer.Config:
    """torchtitan's qwen3_0_6b (tied embeddings) through AutoParallel."""
    return _large(qwen3_0_6b())


def _moe_debug(config) -> AutoParallelTrainer.Config:
    """A torchtitan MoE debug config through AutoParallel, cut to its first 2 layers (the
    second is an MoE layer in both debug models) so a step takes seconds on 2 CPU cores.
    torchtitan's own MoE parallelization (EP) trains the same model from the same config
    with --parallelism.expert_parallel_degree."""
    config = _debug(_for_autoparallel(config), AutoParallelTrainer.Config)
    model = config.model_spec.model
    model.layers = model.layers[:2]
    return config


def qwen3_moe_debug_autoparallel() -> AutoParallelTrainer.Config:
    """torchtitan's Qwen3 MoE debug model (64 experts, top 8) through AutoParallel, with tied
    embeddings so the alias path runs with the router's buffers."""
    config = _moe_debug(qwen3_moe_debug())
    config.model_spec.model.enable_weight_tying = True
    return config


def deepseek_v3_debugmodel_autoparallel() -> AutoParallelTrainer.Config:
    """torchtitan's DeepSeek-V3 debug model (MLA attention, a dense first layer, shared
    experts, expert-bias routing) through AutoParallel."""
    return _moe_debug(deepseek_v3_debugmodel())


def qwen3_30b_a3b_autoparallel() -> AutoParallelTrainer.Config:
    """torchtitan's qwen3_30b_a3b (128 experts, top 8) through AutoParallel."""
    return _large(qwen3_30b_a3b())


def deepseek_v3_16b_autoparallel() -> AutoParallelTrainer.Config:
    """torchtitan's deepseek_v3_16b (64 experts, top 6, 2 shared) through AutoParallel, with
    its recipe's expert_parallel_degree 8 (AutoParallel plans no pipeline stages; the
    recipe's pipeline degree is 1)."""
    return _large(deepseek_v3_16b())
