"""run_train.sh's launcher: config resolution, and every bad input failing before any rank
starts, in a line or two that name the thing and the fix, with exit code 1."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import sys

import pytest
from torchtitan.distributed import ParallelDims

from tests.support.training import REPO_ROOT
from torchtitan_ext import launch
from torchtitan_ext.parallelize.spec import AUTOPARALLEL_COMMIT, plan_key_of


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


def run_train_sh(*args: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHON": sys.executable, "NGPU": "2", **env}
    return subprocess.run(
        [str(REPO_ROOT / "run_train.sh"), *args],
        cwd=REPO_ROOT, env=full_env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def assert_refused_before_launch(proc: subprocess.CompletedProcess, *expected: str, lines=2):
    """Exit 1, at most ``lines`` lines, each expected text, and no rank ever started."""
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    assert len(proc.stderr.strip().splitlines()) <= lines, proc.stderr
    for text in expected:
        assert text in proc.stderr, proc.stderr
    assert "Traceback" not in output and "[rank" not in output and "[titan]" not in output


def test_run_train_sh_rejects_unknown_config_before_launching():
    proc = run_train_sh(CONFIG="nope", MODULE="qwen3")
    assert_refused_before_launch(
        proc,
        "Unknown CONFIG='nope'",
        "torchtitan configs for MODEL=qwen3: qwen3_debugmodel",  # MODULE= works
        lines=3,
    )


BAD_FLAGS = {
    "mesh-does-not-divide-the-ranks": (
        ("--parallelism.data_parallel_shard_degree", "3"),
        ("the parallelism degrees do not fit NGPU=2", "dp_shard(3)", "set NGPU"),
    ),
    "degree-autoparallel-does-not-plan": (
        ("--parallelism.context_parallel_degree", "2",
         "--parallelism.data_parallel_shard_degree", "1"),
        ("plans data, tensor, expert and pipeline parallelism, not "
         "--parallelism.context_parallel_degree 2", "--parallelize torchtitan"),
    ),
    "expert-parallel-without-experts": (
        ("--parallelism.expert_parallel_degree", "2"),
        ("--parallelism.expert_parallel_degree 2: the model of this config has no MoE layer",
         "qwen3_moe_debug_autoparallel"),
    ),
    "expert-parallel-with-tensor-parallel": (
        ("--parallelism.expert_parallel_degree", "2", "--parallelism.tensor_parallel_degree", "2",
         "--parallelism.data_parallel_shard_degree", "1"),
        ("--parallelism.expert_parallel_degree 2 with data parallelism only",
         "--parallelism.tensor_parallel_degree 2: set one of them to 1"),
    ),
    "unknown-option": (
        ("--autoparallel.bogus", "1"),
        ("Unrecognized options: --autoparallel.bogus", "./run_train.sh --help"),
    ),
    "unknown-value": (
        ("--autoparallel.alias_check", "nope"),
        ("invalid choice 'nope' for argument '--autoparallel.alias-check'",
         "('error', 'warn', 'off')"),
    ),
    "misspelled-option": (
        ("--training.stepz", "3"),
        ("Unrecognized options: --training.stepz", "did you mean --training.steps"),
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_bad_flags_are_refused_by_the_launcher(case, monkeypatch, capsys):
    """The launcher in this process (fast): exit 1 and the message, before any rank."""
    args, expected = BAD_FLAGS[case]
    _assert_refused_in_process(monkeypatch, capsys, env={"NGPU": "2"}, args=args, expected=expected)


@pytest.mark.slow  # a launcher process each (torch and torchtitan imports: ~8 s)
@pytest.mark.parametrize("case", list(BAD_FLAGS))
def test_bad_flags_fail_before_any_rank_starts(case):
    """The same, as a user runs it: ./run_train.sh."""
    args, expected = BAD_FLAGS[case]
    assert_refused_before_launch(run_train_sh(*args), *expected)


# torchtitan's parallelization: the launcher's checks of the dump folder, its lock and its
# checkpoints come after AutoParallel's (installed or not), and do not depend on them.
NO_ENGINE = ("--parallelize", "torchtitan")

# Inputs the ranks would take to no step, a traceback each or torchrun's, with the
# environment they need (run_train.sh's NGPU=2 unless set).
BAD_RUNS = {
    "no-step": (
        {}, ("--training.steps", "0"),
        ("--training.steps 0: a run trains at least 1 step", "pass --training.steps 1 or more"),
    ),
    "negative-steps": (
        {}, ("--training.steps", "-1"),
        ("--training.steps -1: a run trains at least 1 step",),
    ),
    "memory-bounds-out-of-order": (
        {}, ("--autoparallel.param_memory_low", "0.9", "--autoparallel.param_memory_high", "0.1"),
        ("--autoparallel.param_memory_low/high must satisfy 0 <= low <= high <= 1, got low 0.9, "
         "high 0.1", "leave them unset (this mesh: low 0, high 0.5)"),
    ),
    "global-batch-not-a-multiple": (
        {"NGPU": "4"}, ("--training.global_batch_size", "16"),
        ("--training.global_batch_size 16 is not a positive multiple of "
         "--training.local_batch_size 8 x data-parallel degree 4 = 32",
         "pass a positive multiple of 32", "or --training.local_batch_size 4"),
    ),
    "dump-folder-not-writable": (
        # Under a regular file (this one): not a folder even for root.
        {}, (*NO_ENGINE, "--dump_folder", f"{__file__}/dump"),
        (f"--dump_folder {__file__}/dump cannot be written (Not a directory)",
         "pass --dump_folder a folder you can write to"),
    ),
    "log-rank-not-ranks": (
        {"LOG_RANK": "abc"}, (),
        ("LOG_RANK='abc' must be rank numbers below NGPU=2", "e.g. LOG_RANK=0 or LOG_RANK=0,1"),
    ),
    "no-rank": (
        {"NGPU": "0"}, (),
        ("NGPU=0: a run needs at least 1 rank", "set NGPU=1 or more, or unset it"),
    ),
    "ranks-not-a-number": (
        {"NGPU": "abc"}, (),
        ("NGPU must be a number of ranks, got 'abc'",),
    ),
    "no-row-per-rank": (
        {}, ("--training.local_batch_size", "0"),
        ("--training.local_batch_size 0: each rank needs at least 1 row",
         "pass --training.local_batch_size 1 or more"),
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_RUNS))
def test_bad_runs_are_refused_by_the_launcher(case, monkeypatch, capsys):
    """The launcher in this process (fast): exit 1 and the message, before any rank."""
    env, args, expected = BAD_RUNS[case]
    env = {"NGPU": "2", "LOG_RANK": "0", "COMM_MODE": "", **env}
    _assert_refused_in_process(monkeypatch, capsys, env=env, args=args, expected=expected, lines=1)


def test_unknown_comm_mode_is_refused_by_the_launcher(tmp_path, monkeypatch, capsys):
    """COMM_MODE becomes --comm.mode, whose choices tyro checks: 2 lines."""
    _assert_refused_in_process(
        monkeypatch, capsys,
        env={"NGPU": "2", "LOG_RANK": "0", "COMM_MODE": "bogus"},
        args=(f"--dump_folder={tmp_path}",),
        expected=("invalid choice 'bogus' for argument '--comm.mode'",
                  "'fake_backend', 'local_tensor'", "./run_train.sh --help"),
    )  # fmt: skip


def _assert_refused_in_process(monkeypatch, capsys, *, env, args, expected, lines=2) -> None:
    """launch.main in this process: exit 1, at most ``lines`` lines holding ``expected``,
    no launch."""
    for name, value in {"CONFIG": "llama3_debugmodel_autoparallel", **env}.items():
        monkeypatch.setenv(name, value)
    # Launching (torchrun, or COMM_MODE's training process) would raise TypeError.
    monkeypatch.setattr(launch, "_start", None)
    assert launch.main(list(args)) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) <= lines, err
    for text in expected:
        assert text in err, err


@pytest.mark.slow  # a launcher process each
@pytest.mark.parametrize("case", list(BAD_RUNS))
def test_bad_runs_fail_before_any_rank_starts(case):
    """The same, as a user runs it: ./run_train.sh."""
    env, args, expected = BAD_RUNS[case]
    assert_refused_before_launch(run_train_sh(*args, **env), *expected)


@pytest.mark.parametrize(
    "log_rank, ok", [("0", True), ("0,1", True), ("1,0", True), ("0,2", False), ("-1", False),
                     ("0,", False), (" 0", False), ("", False)],
)  # fmt: skip
def test_log_rank_names_only_ranks_that_run(log_rank, ok):
    if ok:
        launch.check_log_rank(log_rank, ngpu=2)
    else:
        with pytest.raises(ValueError, match="must be rank numbers below NGPU=2"):
            launch.check_log_rank(log_rank, ngpu=2)


def test_dump_folder_is_created_as_the_ranks_would(tmp_path):
    folder = tmp_path / "new" / "dump"
    launch.make_dump_folder(str(folder))
    assert folder.is_dir() and not list(folder.iterdir())  # the probe file is gone


def test_missing_autoparallel_fails_with_the_install_line(tmp_path):
    shadow = tmp_path / "autoparallel"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('No module named autoparallel')\n")
    proc = run_train_sh(PYTHONPATH=str(tmp_path))
    assert_refused_before_launch(
        proc, "Meta's AutoParallel is not installed", f"@{AUTOPARALLEL_COMMIT}' pulp", lines=1
    )


@pytest.fixture(scope="module")
def plan_keys() -> dict[str, dict]:
    """plan_key_of() the debug config as run_train.sh's NGPU=2 run builds it, and of runs
    that differ in one thing each."""

    def key(*args: str, config: str = "llama3_debugmodel_autoparallel", world_size: int = 2):
        parsed = launch.parse_config("config_registry", config, list(args))
        return plan_key_of(parsed, ParallelDims.from_config(parsed.parallelism, world_size))

    return {
        "this run": key(),
        "another model": key(config="llama3_debugmodel_shared_rope_autoparallel"),
        "another mesh": key(world_size=1),
        "another batch size": key("--training.local_batch_size", "4"),
        "another dtype": key("--training.dtype", "bfloat16"),
    }  # fmt: skip


@pytest.mark.slow  # a launcher process each
@pytest.mark.engine
@pytest.mark.parametrize(
    "case, expected",
    [
        ("another model", "was solved for model SharedRoPELlama3Model.Config"),
        ("another mesh", "was solved for mesh {'dp_shard': 1}, inputs [8, 256]"),
        ("another batch size", "was solved for inputs [8, 256]; this run has inputs [16, 256]"),
        ("another dtype", "was solved for dtypes {'param': 'float32', 'reduce': 'float32', "
                          "'model': 'bfloat16'}"),
        ("no key", "has no torchtitan_ext plan key"),
    ],
)  # fmt: skip
def test_placement_file_of_another_plan_is_refused(case, expected, plan_keys, tmp_path):
    plan_file = _placement_file(tmp_path, plan_keys, case)
    proc = run_train_sh(
        f"--dump_folder={tmp_path}", "--autoparallel.placement_file", "placements.json"
    )
    assert_refused_before_launch(proc, f"placement file {plan_file}", expected, "delete it")


def _placement_file(folder, plan_keys: dict[str, dict], case: str):
    """A placement file whose plan key is that of ``case`` (none for "no key")."""
    plan_file = folder / "placements.json"
    saved = {"version": 1, "mesh_shape": [2], "mesh_dim_names": ["dp_shard"], "placements": {}}
    if case != "no key":
        assert plan_keys[case] != plan_keys["this run"]
        saved["torchtitan_ext_plan_key"] = plan_keys[case]
    plan_file.write_text(json.dumps(saved))
    return plan_file


@pytest.mark.engine
@pytest.mark.parametrize("case", ["another mesh", "no key"])
def test_placement_file_of_another_plan_is_refused_by_the_launcher(
    case, plan_keys, tmp_path, monkeypatch, capsys
):
    plan_file = _placement_file(tmp_path, plan_keys, case)
    monkeypatch.setenv("NGPU", "2")
    monkeypatch.setenv("CONFIG", "llama3_debugmodel_autoparallel")
    monkeypatch.setattr(launch, "_torchrun_argv", None)  # launching would raise TypeError
    args = [f"--dump_folder={tmp_path}", "--autoparallel.placement_file", "placements.json"]
    assert launch.main(args) == 1
    err = capsys.readouterr().err
    assert f"placement file {plan_file}" in err and "delete it" in err, err


@pytest.mark.engine
def test_placement_file_not_json_is_refused_by_the_launcher(tmp_path, monkeypatch, capsys):
    plan_file = tmp_path / "placements.json"
    plan_file.write_text('{"version": 1,')  # cut short
    _assert_refused_in_process(
        monkeypatch, capsys,
        env={"NGPU": "2", "LOG_RANK": "0", "COMM_MODE": ""},
        args=(f"--dump_folder={tmp_path}", "--autoparallel.placement_file", "placements.json"),
        expected=(f"placement file {plan_file} is not readable JSON (Expecting property name",
                  "delete it to solve again, or pass another --autoparallel.placement_file"),
        lines=1,
    )  # fmt: skip


@pytest.fixture(scope="module")
def solved_placement_file(tmp_path_factory):
    """A placement file as the ranks write it: the component's solve for run_train.sh's
    default run (NGPU=2, the debug config), planned on 2 fake ranks in another process."""
    plan_file = tmp_path_factory.mktemp("solved") / "placements.json"
    proc = subprocess.run(
        [sys.executable, "-m", "tests.support.plan_probe", "--world", "2",
         "--autoparallel.placement_file", str(plan_file)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0 and plan_file.exists(), (proc.stdout + proc.stderr)[-3000:]
    return json.loads(plan_file.read_text())


def _edited(solved: dict, edit) -> dict:
    """A copy of the solved file, ``edit(copy, first parameter node)`` applied."""
    copy = json.loads(json.dumps(solved))
    edit(copy, next(iter(copy["torchtitan_ext_parameters"])))
    return copy


EDITED_BODIES = {
    "shard beyond the rank": (
        lambda f, node: f["placements"][node].update(output="S(7)"),
        "'S(7)' shards a dim a 2-dim tensor lacks",
    ),
    "placement for another mesh": (
        lambda f, node: f["placements"][node].update(output="S(0)R"),
        "'S(0)R' is not 1 placement(s)",
    ),
    "parameter the model lacks": (
        lambda f, node: f["torchtitan_ext_parameters"][node].update(fqn="layers.9.w.weight"),
        "layers.9.w.weight is not a parameter of this model",
    ),
    "parameter of another rank": (
        lambda f, node: f["torchtitan_ext_parameters"][node].update(rank=3),
        "has 2 dims, not 3",
    ),
}


@pytest.mark.engine
def test_placement_file_the_ranks_wrote_passes_the_launchers_check(solved_placement_file, tmp_path):
    """The key and body the component wrote on the ranks are what the launcher computes
    from the parsed config (two code paths; the file is not made by the check's own key)."""
    assert solved_placement_file["torchtitan_ext_parameters"]
    (tmp_path / "placements.json").write_text(json.dumps(solved_placement_file))
    config = launch.parse_config(
        "config_registry",
        "llama3_debugmodel_autoparallel",
        [f"--dump_folder={tmp_path}", "--autoparallel.placement_file", "placements.json"],
    )
    launch.check(config, world_size=2)


@pytest.mark.engine
@pytest.mark.parametrize("case", list(EDITED_BODIES))
def test_placement_file_with_an_edited_body_is_refused_by_the_launcher(
    case, solved_placement_file, tmp_path, monkeypatch, capsys
):
    """The key is this run's; the body places a parameter as the model cannot have it."""
    edit, expected = EDITED_BODIES[case]
    plan_file = tmp_path / "placements.json"
    plan_file.write_text(json.dumps(_edited(solved_placement_file, edit)))
    _assert_refused_in_process(
        monkeypatch, capsys,
        env={"NGPU": "2", "LOG_RANK": "0", "COMM_MODE": ""},
        args=(f"--dump_folder={tmp_path}", "--autoparallel.placement_file", "placements.json"),
        expected=(f"placement file {plan_file} does not fit this model", expected,
                  "delete it to solve again"),
        lines=1,
    )  # fmt: skip


@pytest.mark.slow  # a launcher process
@pytest.mark.engine
def test_placement_file_with_an_edited_body_fails_before_any_rank_starts(
    solved_placement_file, tmp_path
):
    edit, expected = EDITED_BODIES["shard beyond the rank"]
    (tmp_path / "placements.json").write_text(json.dumps(_edited(solved_placement_file, edit)))
    proc = run_train_sh(
        f"--dump_folder={tmp_path}", "--autoparallel.placement_file", "placements.json"
    )
    assert_refused_before_launch(proc, "does not fit this model", expected, "delete it", lines=1)


# --- one run per dump folder ---

LOCK_FILE = ".torchtitan_ext.lock"


def _launch_in_process(monkeypatch, *args: str, **env: str) -> int:
    """launch.main in this process, with run_train.sh's environment; launching raises."""
    for name, value in {"NGPU": "2", "LOG_RANK": "0", "COMM_MODE": "", **env}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("CONFIG", "llama3_debugmodel_autoparallel")
    monkeypatch.setattr(launch, "_torchrun_argv", None)  # launching would raise TypeError
    return launch.main([*NO_ENGINE, *args])


def _holding_the_lock(folder):
    """The lock file of ``folder``, locked by this process and naming it, as a live run's."""
    f = open(folder / LOCK_FILE, "w")
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": "2030-01-02 03:04:05"}
    f.write(json.dumps(holder))
    f.flush()
    return f


IN_USE = ("is in use by another run (pid {pid} on host", "started 2030-01-02 03:04:05",
          "wait for it to finish or stop it, or pass another --dump_folder")  # fmt: skip


def test_folder_in_use_is_refused_by_the_launcher(tmp_path, monkeypatch, capsys):
    with _holding_the_lock(tmp_path):
        assert _launch_in_process(monkeypatch, f"--dump_folder={tmp_path}") == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert f"--dump_folder {tmp_path} is in use" in err, err
    for text in IN_USE:
        assert text.format(pid=os.getpid()) in err, err


@pytest.mark.slow  # a launcher process
def test_folder_in_use_is_refused_before_any_rank_starts(tmp_path):
    with _holding_the_lock(tmp_path):
        proc = run_train_sh(*NO_ENGINE, f"--dump_folder={tmp_path}", "--training.steps", "1")
    expected = [text.format(pid=os.getpid()) for text in IN_USE]
    assert_refused_before_launch(proc, *expected, lines=1)


def _dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


@pytest.mark.parametrize("comm_mode", ["", "fake_backend"])
def test_launcher_holds_the_lock_while_its_ranks_run(comm_mode, tmp_path, monkeypatch, capsys):
    """A dead run's lock file (there, not locked) is taken over with a warning naming that
    run; the lock is held, naming this process, while torchrun (or the COMM_MODE process)
    runs, and removed after."""
    dead = _dead_pid()
    stale = {"pid": dead, "host": socket.gethostname(), "started": "2030-01-02 03:04:05"}
    (tmp_path / LOCK_FILE).write_text(json.dumps(stale))
    ran = []

    def ranks(*_):
        with open(tmp_path / LOCK_FILE) as f:
            with pytest.raises(BlockingIOError):
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            ran.append(json.load(f)["pid"])

    import torch.distributed.run

    from torchtitan_ext import train

    monkeypatch.setattr(torch.distributed.run, "main", ranks)
    monkeypatch.setattr(train, "main", ranks)
    # What the launcher sets for its ranks, restored after the test.
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "")
    for name, value in {"NGPU": "2", "LOG_RANK": "0", "COMM_MODE": comm_mode}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("CONFIG", "llama3_debugmodel_autoparallel")
    assert launch.main([*NO_ENGINE, f"--dump_folder={tmp_path}"]) == 0
    assert ran == [os.getpid()]
    assert not (tmp_path / LOCK_FILE).exists()
    ours = [line for line in capsys.readouterr().err.splitlines() if "run_train.sh" in line]
    assert ours == [
        f"run_train.sh: warning: taking over {tmp_path / LOCK_FILE}, left by a run that ended "
        f"without removing it (pid {dead} on host {socket.gethostname()}, started "
        "2030-01-02 03:04:05; killed, or its machine went down)"
    ]


# --- resuming from a checkpoint whose .metadata DCP cannot read ---


def _checkpoints(folder, *, broken: bytes | None):
    """<folder>/checkpoint: intact DCP checkpoints step-2 and step-4, step-4's .metadata
    replaced by ``broken`` (None: cut in half), and step-6 a killed save (no .metadata),
    which torchtitan skips."""
    import torch
    import torch.distributed.checkpoint as dcp

    for step in (2, 4, 6):
        dcp.save({"w": torch.ones(4)}, checkpoint_id=folder / f"step-{step}", no_dist=True)
    metadata = folder / "step-4" / ".metadata"
    whole = metadata.read_bytes()
    metadata.write_bytes(whole[: len(whole) // 2] if broken is None else broken)
    (folder / "step-6" / ".metadata").unlink()


def _broken_newest(checkpoint_folder) -> tuple[str, ...]:
    return (
        f"checkpoint {checkpoint_folder}/step-4 has ",
        "torchtitan would resume from it and fail on every rank",
        "The newest intact step is step-2: pass --checkpoint.load_step 2 to resume from it, "
        f"or move step-4 out of {checkpoint_folder}",
    )


@pytest.mark.parametrize(
    "broken, problem",
    [(None, "an unreadable .metadata (UnpicklingError: pickle data was truncated)"),
     (b"", "an empty .metadata")],
    ids=["truncated", "empty"],
)  # fmt: skip
def test_broken_newest_checkpoint_is_refused_by_the_launcher(
    broken, problem, tmp_path, monkeypatch, capsys
):
    _checkpoints(tmp_path / "checkpoint", broken=broken)
    args = [f"--dump_folder={tmp_path}", "--checkpoint.enable"]
    assert _launch_in_process(monkeypatch, *args) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 2, err
    for text in (*_broken_newest(tmp_path / "checkpoint"), problem):
        assert text in err, err
    # What it says passes: an explicit step, or the broken folder moved away.
    config = launch.parse_config(
        "config_registry",
        "llama3_debugmodel_autoparallel",
        [*NO_ENGINE, *args, "--checkpoint.load_step", "2"],
    )
    launch.check(config, world_size=2)
    (tmp_path / "checkpoint" / "step-4").rename(tmp_path / "step-4")
    launch.check(
        launch.parse_config(
            "config_registry", "llama3_debugmodel_autoparallel", [*NO_ENGINE, *args]
        ),
        world_size=2,
    )


@pytest.mark.slow  # a launcher process
def test_broken_newest_checkpoint_is_refused_before_any_rank_starts(tmp_path):
    _checkpoints(tmp_path / "checkpoint", broken=None)
    proc = run_train_sh(
        *NO_ENGINE, f"--dump_folder={tmp_path}", "--checkpoint.enable", "--training.steps", "1"
    )
    assert_refused_before_launch(proc, *_broken_newest(tmp_path / "checkpoint"))


def test_no_intact_checkpoint_is_refused_by_the_launcher(tmp_path, monkeypatch, capsys):
    """Every step with a .metadata broken: no step to name, only the folders to move."""
    folder = tmp_path / "checkpoint"
    _checkpoints(folder, broken=b"")
    (folder / "step-2" / ".metadata").write_bytes(b"")
    args = [f"--dump_folder={tmp_path}", "--checkpoint.enable"]
    assert _launch_in_process(monkeypatch, *args) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 2, err
    for text in (
        f"checkpoint {folder}/step-4 has an empty .metadata",
        "torchtitan would resume from it and fail on every rank (broken too: step-2)",
        f"No older step is intact: move step-4, step-2 out of {folder} to start without them",
    ):
        assert text in err, err
    assert "--checkpoint.load_step" not in err, err
