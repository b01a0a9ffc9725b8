"""Kill a training process during a DCP checkpoint write (integration runs).

An integration run puts this folder on PYTHONPATH, so every Python process of the command
imports this file as ``sitecustomize`` at start-up. With ``TORCHTITAN_EXT_TEST_KILL_SAVE=
step-N`` set, a process that writes the checkpoint folder ``step-N`` with
torch.distributed.checkpoint's FileSystemWriter kills itself with SIGKILL after its shard
files are written and before ``.metadata`` exists (``finish()`` writes it once every rank's
``write_data`` is done): the folder is left incomplete, as by a crash during a save.
Without the variable nothing is patched.

torch is not imported here (every process imports this file, torchrun's launcher too): the
patch is applied when torch.distributed.checkpoint.filesystem is first imported.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import signal
import sys

_TARGET = "torch.distributed.checkpoint.filesystem"
_KILL_AT = os.environ.get("TORCHTITAN_EXT_TEST_KILL_SAVE", "")


def _patch(module) -> None:
    writer = module.FileSystemWriter
    write_data = writer.write_data

    def write_data_then_die(self, plan, planner):
        result = write_data(self, plan, planner)
        if os.path.basename(os.path.normpath(str(self.path))) == _KILL_AT:
            result.wait()  # this rank's shard files are on disk; .metadata is not
            print(f"[kill-shim] SIGKILL during the DCP save of {self.path}", flush=True)
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    writer.write_data = write_data_then_die


class _PatchOnImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            _patch(module)

        spec.loader.exec_module = exec_and_patch
        return spec


if _KILL_AT:
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
