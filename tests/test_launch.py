"""run_train.sh's config resolution."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests._training import REPO_ROOT
from torchtitan_ext import launch


def test_our_configs_resolve_to_the_root_registry():
    assert launch.resolve("llama3", "llama3_debugmodel_autoparallel") == "config_registry"
    # MODEL does not matter for our configs.
    assert launch.resolve("qwen3", "llama3_debugmodel_cpu") == "config_registry"


def test_torchtitan_configs_resolve_to_their_model():
    assert launch.resolve("llama3", "llama3_debugmodel") == "llama3"
    assert launch.resolve("qwen3", "qwen3_debugmodel") == "qwen3"


def test_unknown_config_lists_both_registries():
    with pytest.raises(ValueError) as info:
        launch.resolve("llama3", "llama3_debugmodel_typo")
    message = str(info.value)
    assert "Unknown CONFIG='llama3_debugmodel_typo'" in message
    assert "llama3_debugmodel_autoparallel" in message  # ours
    assert "llama3_8b" in message  # torchtitan's for MODEL=llama3


def test_run_train_sh_rejects_unknown_config_before_launching():
    env = {**os.environ, "CONFIG": "nope", "MODULE": "qwen3", "PYTHON": sys.executable}
    proc = subprocess.run(
        [str(REPO_ROOT / "run_train.sh")], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "Unknown CONFIG='nope'" in proc.stderr
    assert "torchtitan configs for MODEL=qwen3: qwen3_debugmodel" in proc.stderr  # MODULE= works
    assert "torch.distributed.run" not in proc.stdout + proc.stderr
