"""Faults injected into training runs by tests, to prove their checks catch them.

A test puts this folder on PYTHONPATH, so every Python process of the command imports this
file as ``sitecustomize`` at start-up; the environment says which fault, if any:

- ``TORCHTITAN_EXT_TEST_KILL_SAVE=step-N`` (integration runs): a process that writes the
  checkpoint folder ``step-N`` with torch.distributed.checkpoint's FileSystemWriter kills
  itself with SIGKILL after its shard files are written and before ``.metadata`` exists
  (``finish()`` writes it once every rank's ``write_data`` is done): the folder is left
  incomplete, as by a crash during a save.
- ``TORCHTITAN_EXT_TEST_FAULT=grad_scale_2x`` (parity): every gradient of the AutoParallel
  model is doubled once the backward accumulated it, as a wrong data-parallel averaging
  factor would scale it.
- ``TORCHTITAN_EXT_TEST_FAULT=drop_alias`` (parity): once init_weights ran (and the alias
  check after it passed), the alias name ``lm_head.weight`` is removed from the AutoParallel
  model; ``tok_embeddings.weight``, the name its graph reads, stays.
- ``TORCHTITAN_EXT_TEST_FAULT=drop_expert_grad_reduction`` (expert parallelism): the expert
  region declares its weights' gradients complete on efsdp and dp_replicate (as local_map
  did before torchtitan_ext declared them partial), so the plan drops their data-parallel
  reduction; ``drop_expert_grad_reduction_unchecked`` also turns off the start-up check
  that refuses such a plan, so the run trains with it.
- ``TORCHTITAN_EXT_TEST_FAULT=skip_tied_grad_sum`` / ``skip_tied_init_sync`` (pipeline
  parallelism): the Trainer leaves each pipeline stage's copy of the tied embeddings with
  its own gradient (no sum across stages) / with its own stage's init.

Without the variables nothing is patched. torch is not imported here (every process
imports this file, torchrun's launcher too): each patch is applied when its module is
first imported.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import signal
import sys

_KILL_AT = os.environ.get("TORCHTITAN_EXT_TEST_KILL_SAVE", "")
_FAULT = os.environ.get("TORCHTITAN_EXT_TEST_FAULT", "")
_FAULTS = (
    "",
    "grad_scale_2x",
    "drop_alias",
    "drop_expert_grad_reduction",
    "drop_expert_grad_reduction_unchecked",
    "skip_tied_grad_sum",
    "skip_tied_init_sync",
)
if _FAULT not in _FAULTS:
    raise ValueError(f"TORCHTITAN_EXT_TEST_FAULT must be one of {_FAULTS}, got {_FAULT!r}")


def _flush_tensorboard() -> None:
    """Write out the losses TensorBoard holds in memory: the killed command's steps are the
    uninterrupted reference its resumed rerun is compared with, at full precision."""
    import gc

    for obj in gc.get_objects():
        if type(obj).__name__ == "SummaryWriter":
            obj.flush()


def _kill_during_save(module) -> None:
    writer = module.FileSystemWriter
    write_data = writer.write_data

    def write_data_then_die(self, plan, planner):
        result = write_data(self, plan, planner)
        if os.path.basename(os.path.normpath(str(self.path))) == _KILL_AT:
            result.wait()  # this rank's shard files are on disk; .metadata is not
            _flush_tensorboard()
            print(f"[kill-shim] SIGKILL during the DCP save of {self.path}", flush=True)
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    writer.write_data = write_data_then_die


def _double_grad(param) -> None:
    param.grad.mul_(2)


def _faulty_autoparallel(module) -> None:
    component = module.AliasAwareAutoParallel
    parallelize = component.__call__

    def parallelize_with_fault(self, model, **kwargs):
        parallel = parallelize(self, model, **kwargs)
        init_weights = parallel.init_weights

        # After init_weights: the Trainer's to_empty() has replaced the meta parameters.
        def init_weights_then_fault(*args, **kw):
            result = init_weights(*args, **kw)
            if _FAULT == "grad_scale_2x":
                for param in parallel.parameters():
                    param.register_post_accumulate_grad_hook(_double_grad)
            else:
                del parallel.lm_head._parameters["weight"]
            print(f"[fault-shim] {_FAULT} injected into the AutoParallel model", flush=True)
            return result

        parallel.init_weights = init_weights_then_fault
        return parallel

    component.__call__ = parallelize_with_fault


def _expert_grads_declared_complete(module) -> None:
    module.EXPERT_GRAD_PARTIAL_AXES = ()
    print(f"[fault-shim] {_FAULT} injected into the expert region", flush=True)


def _no_expert_gradient_check(module) -> None:
    module.check_expert_gradients = lambda *args, **kwargs: None


def _tied_stages_fault(module) -> None:
    method = "sum_gradients" if _FAULT == "skip_tied_grad_sum" else "sync_values"

    def skipped(self):
        print(f"[fault-shim] {_FAULT}: TiedStages.{method} skipped", flush=True)

    setattr(module.TiedStages, method, skipped)


_PATCHES = {}
if _KILL_AT:
    _PATCHES["torch.distributed.checkpoint.filesystem"] = _kill_during_save
if _FAULT in ("grad_scale_2x", "drop_alias"):
    _PATCHES["torchtitan_ext.parallelize.component"] = _faulty_autoparallel
if _FAULT.startswith("drop_expert_grad_reduction"):
    _PATCHES["torchtitan_ext.parallelize.expert_parallel"] = _expert_grads_declared_complete
if _FAULT.startswith("skip_tied_"):
    _PATCHES["torchtitan_ext.tied_stages"] = _tied_stages_fault
if _FAULT == "drop_expert_grad_reduction_unchecked":
    _PATCHES["torchtitan_ext.parallelize.component"] = _no_expert_gradient_check


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in _PATCHES:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _PATCHES[name](module)

        spec.loader.exec_module = exec_and_patch
        return spec


if _PATCHES:
    sys.meta_path.insert(0, _PatchOnImport())


def _run_shadowed_sitecustomize() -> None:
    """Run the sitecustomize this file shadows, if the environment has one."""
    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        folder = os.path.abspath(entry or os.getcwd())
        candidate = os.path.join(folder, "sitecustomize.py")
        if folder != here and os.path.isfile(candidate):
            with open(candidate, encoding="utf-8") as f:
                code = compile(f.read(), candidate, "exec")
            exec(code, {"__name__": "sitecustomize", "__file__": candidate})
            return


_run_shadowed_sitecustomize()
