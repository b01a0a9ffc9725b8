"""What the tests use that is not a test: helper modules, subprocess scripts, fault shims.

- ``training``: runs ./run_train.sh and parses its step lines and TensorBoard losses; imported.
- ``alias_models``: toy models with aliased parameters, buffers, submodules; imported.
- ``alias_engines``: transforms that break aliasing, and their checks; imported.
- ``checkpoint_roundtrip``: DCP round trip eager <-> AutoParallel; subprocess script
  (``python -m tests.support.checkpoint_roundtrip``), its constants also imported.
- ``plan_probe``: plans a config on a fake process group of any size; subprocess script
  (``python -m tests.support.plan_probe``).
- ``soak``: the main job N times in a row; imported by tests/test_soak.py, and a script
  (``python -m tests.support.soak``) run by hand.
- ``integration/``: the named integration runs (``runs``), their checks (``checks``) and
  the runner (``run_tests``); imported, and the runner a script
  (``python -m tests.support.integration.run_tests``, run by the GPU workflow).
- ``faults/``: a folder holding only ``sitecustomize.py``, the fault shim; never imported,
  put on the PYTHONPATH of training subprocesses by tests and integration runs.
"""
