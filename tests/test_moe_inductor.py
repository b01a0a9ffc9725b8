"""Inductor and torch._grouped_mm: the layout constraint of
``torchtitan_ext.patches.grouped_mm_inputs_keep_eager_strides``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# The backward's weight gradient of an expert layer, reduced to its shape: the routed tokens
# (their count u0 is known only at run time, as after an all_to_all) transposed into
# _grouped_mm's first operand. Eager, x.t() is a view with strides (1, 8); unconstrained,
# Inductor materializes it as a contiguous (8, u0) buffer whose row stride, 6 floats, is not
# a multiple of 16 bytes. The layout constraint is global to the process: one compile
# without it, then one with it, Inductor's caches off (their key does not hold it).
_SCRIPT = """
import torch
from torchtitan_ext.patches import float32_grouped_mm_meta, grouped_mm_inputs_keep_eager_strides

float32_grouped_mm_meta()
torch._dynamo.config.capture_scalar_outputs = True


def weight_grad(x, go, offs):
    tokens = offs[-1].item()
    torch._check(tokens >= 0)
    torch._check(tokens <= x.shape[0])
    routed = torch.arange(tokens)
    return torch._grouped_mm((x[routed] * 2.0).t(), go[routed], offs=offs)


x, go, offs = torch.randn(6, 8), torch.randn(6, 4), torch.tensor([2, 6], dtype=torch.int32)
want = weight_grad(x, go, offs)
try:
    torch.compile(weight_grad, fullgraph=True)(x, go, offs)
    print("unconstrained: ran")
except RuntimeError as e:
    print("unconstrained:", str(e).splitlines()[-1])
torch._dynamo.reset()
grouped_mm_inputs_keep_eager_strides()
got = torch.compile(weight_grad, fullgraph=True)(x, go, offs)
print("constrained: max diff", (got - want).abs().max().item())
"""


@pytest.mark.slow  # two Inductor compiles in a fresh process (~20 s)
def test_grouped_mm_inputs_keep_eager_strides():
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT],
        env={**os.environ, "TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    # Without the constraint the case must fail as the expert-parallel run did, or it
    # tests nothing (if torch stops failing here, the constraint may be unneeded).
    assert "unconstrained: strides should be multiple of 16 bytes" in lines, proc.stdout
    assert "constrained: max diff 0.0" in lines, proc.stdout
