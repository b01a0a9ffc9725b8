"""The GitHub Actions workflows: valid for GitHub (check-jsonschema's vendored workflow
schema, offline), and pointing at what this repository has and pins."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from tests.support.integration import run_tests
from tests.support.integration.runs import RUNS
from tests.support.training import REPO_ROOT
from torchtitan_ext.parallelize.spec import AUTOPARALLEL_COMMIT

WORKFLOWS = REPO_ROOT / ".github" / "workflows"
GPU_WORKFLOW = WORKFLOWS / "gpu_integration.yml"
CPU_WORKFLOW = WORKFLOWS / "cpu.yml"
AUTOPARALLEL_GIT = "git+https://github.com/meta-pytorch/autoparallel.git@"


def _validate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows"]
        + [str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _steps(workflow: dict) -> list[dict]:
    return [step for job in workflow["jobs"].values() for step in job.get("steps", [])]


def _scripts(workflow: dict) -> list[str]:
    return [step["run"] for step in _steps(workflow) if "run" in step]


def _lines(workflow: dict) -> list[str]:
    """Each shell command of the run scripts, continuation lines joined."""
    lines = []
    for script in _scripts(workflow):
        lines += [line.strip() for line in script.replace("\\\n", " ").splitlines()]
    return [" ".join(line.split()) for line in lines if line]


def test_there_are_the_two_workflows():
    assert sorted(p.name for p in WORKFLOWS.glob("*.y*ml")) == ["cpu.yml", "gpu_integration.yml"]


@pytest.mark.parametrize("path", sorted(WORKFLOWS.glob("*.y*ml")), ids=lambda p: p.name)
def test_workflow_is_valid_for_github(path):
    proc = _validate(path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_validator_rejects_a_broken_workflow(tmp_path):
    broken = tmp_path / "broken.yml"
    workflow = _load(GPU_WORKFLOW)
    job = next(iter(workflow["jobs"].values()))
    del job["runs-on"]  # a job must say where it runs
    job["steps"][0]["uses"] = 3
    broken.write_text(yaml.safe_dump(workflow))
    proc = _validate(broken)
    assert proc.returncode != 0, proc.stdout


@pytest.mark.parametrize("path", sorted(WORKFLOWS.glob("*.y*ml")), ids=lambda p: p.name)
def test_scripts_are_valid_bash_and_actions_are_pinned(path, tmp_path):
    workflow = _load(path)
    for number, script in enumerate(_scripts(workflow)):
        # ${{ ... }} expressions are substituted by GitHub before bash runs the script.
        text = re.sub(r"\$\{\{[^}]*\}\}", "EXPRESSION", script)
        file = tmp_path / f"step{number}.sh"
        file.write_text(text)
        proc = subprocess.run(["bash", "-n", str(file)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{path.name} step {number}: {proc.stderr}\n{script}"
    for step in _steps(workflow):
        if "uses" in step:
            assert re.fullmatch(r"[\w.-]+/[\w.-]+@(v\d+|[0-9a-f]{40})", step["uses"]), step


def test_gpu_workflow_pins_the_autoparallel_commit_of_the_code_and_pyproject():
    workflow = _load(GPU_WORKFLOW)
    assert workflow["env"]["AUTOPARALLEL_COMMIT"] == AUTOPARALLEL_COMMIT
    with open(REPO_ROOT / "pyproject.toml", "rb") as f:
        extra = tomllib.load(f)["project"]["optional-dependencies"]["autoparallel"]
    assert f"autoparallel @ {AUTOPARALLEL_GIT}{AUTOPARALLEL_COMMIT}" in extra
    # No other commit is written anywhere in the workflow.
    commits = set(re.findall(r"\b[0-9a-f]{40}\b", GPU_WORKFLOW.read_text()))
    assert commits == {AUTOPARALLEL_COMMIT}


def test_gpu_workflow_installs_the_stack_and_runs_the_gpu_tier_on_8_gpus():
    workflow = _load(GPU_WORKFLOW)
    (job,) = workflow["jobs"].values()
    assert "self-hosted" in job["runs-on"] and "gpu-8" in job["runs-on"]
    lines = _lines(workflow)
    install = next(line for line in lines if "torchtitan==0.3.0" in line)
    assert '"torch>=2.14"' in install and "pulp" in install
    assert f'"autoparallel @ {AUTOPARALLEL_GIT}${{AUTOPARALLEL_COMMIT}}"' in install
    assert "python -m pip install -e '.[dev]'" in lines

    (run,) = [line for line in lines if "tests.support.integration.run_tests" in line]
    argv = shlex.split(run)
    assert argv[:3] == ["python", "-m", "tests.support.integration.run_tests"]
    module = REPO_ROOT / Path(*argv[2].split(".")).with_suffix(".py")
    assert module.is_file(), module
    options = dict(zip(argv[4::2], argv[5::2], strict=False))
    assert options["--tier"] == "gpu" and options["--ngpu"] == "8"
    assert "--require-engine" in argv  # a missing engine must fail the job, not skip
    gpu_runs = run_tests.select(RUNS, tier="gpu", pattern="")
    assert gpu_runs and max(r.ngpu for r in gpu_runs) <= 8
    assert {4, 8} <= {r.ngpu for r in gpu_runs}


def _readme_commands(heading: str) -> list[str]:
    """The commands of the bash blocks of a README section (up to the next heading),
    continuation lines joined, comments dropped."""
    section, blocks, block, fence = None, [], None, False
    for line in (REPO_ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            fence = not fence
            if fence and section and line == "```bash":
                block = []
            elif not fence and block is not None:
                blocks.append("\n".join(block))
                block = None
            continue
        if not fence and re.match(r"#+ ", line):
            if section:
                break
            section = line.lstrip("#").strip() == heading
            continue
        if block is not None:
            block.append(line)
    assert blocks, f"README has no section {heading!r} with a bash block"
    commands = []
    for text in blocks:
        for line in text.replace("\\\n", " ").splitlines():
            line = " ".join(line.split("#")[0].split())
            if line:
                commands.append(line)
    return commands


def test_cpu_workflow_runs_the_readme_set_up_and_test_commands():
    workflow = _load(CPU_WORKFLOW)
    lines = _lines(workflow)
    set_up = _readme_commands("Set up")
    test = _readme_commands("Test")
    autoparallel = _readme_commands("AutoParallel")[0]
    assert set_up == ["python3 -m pip install -e '.[dev]'"]
    assert test == ["python3 -m pytest"]
    assert autoparallel == "python3 -m pip install -e '.[autoparallel]'"
    for command in [*set_up, *test, autoparallel]:
        assert command in lines, command
    assert lines.index(set_up[0]) < lines.index(autoparallel) < lines.index(test[0])
    (job,) = workflow["jobs"].values()
    assert job["strategy"]["matrix"]["autoparallel"] == ["installed", "absent"]
    steps = {step.get("name"): step for step in job["steps"]}
    assert steps["AutoParallel (README)"]["if"] == "matrix.autoparallel == 'installed'"
    # .ci/run runs the same two README commands.
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert set_up[0] in ci and test[0] in ci


def test_cpu_workflow_requires_the_engine_where_it_installs_it():
    workflow = _load(WORKFLOWS / "cpu.yml")
    (job,) = workflow["jobs"].values()
    (test,) = [s for s in job["steps"] if s.get("run") == "python3 -m pytest"]
    assert test["env"]["TORCHTITAN_EXT_REQUIRE_ENGINE"] == (
        "${{ matrix.autoparallel == 'installed' && '1' || '0' }}"
    )
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert "export TORCHTITAN_EXT_REQUIRE_ENGINE=1" in ci and "find_spec('autoparallel')" in ci


def _pytest_without_engine(tmp_path, *args: str, require: str) -> subprocess.CompletedProcess:
    """Run one engine test with an 'autoparallel' package that fails to import (a broken
    install), in a subprocess."""
    shadow = tmp_path / "shadow" / "autoparallel"
    shadow.mkdir(parents=True, exist_ok=True)
    (shadow / "__init__.py").write_text("raise ImportError('broken autoparallel install')\n")
    env = {
        **os.environ,
        "PYTHONPATH": f"{shadow.parent}{os.pathsep}{REPO_ROOT}",
        "TORCHTITAN_EXT_REQUIRE_ENGINE": require,
    }
    test = "tests/test_cpu.py::test_cost_model_device_limits_on_cpu"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rsf", test, *args],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.slow  # two pytest processes
def test_a_broken_engine_skips_where_optional_and_fails_where_required(tmp_path):
    optional = _pytest_without_engine(tmp_path, require="0")
    assert optional.returncode == 0, optional.stdout
    assert "1 skipped" in optional.stdout
    assert "Meta's AutoParallel is not installed" in optional.stdout
    assert "broken autoparallel install" in optional.stdout  # the cause, with the fix

    required = _pytest_without_engine(tmp_path, require="1")  # or --require-engine
    assert required.returncode == 1, required.stdout
    assert "1 failed" in required.stdout and "skipped" not in required.stdout
