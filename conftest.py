"""Collection rules for the whole repository (doctests of `optimal_sampling` included).

The suite runs in two environments: the main one (everything but the engine tests, under the
newest transformers) and the vLLM one (`.ci/install_vllm.sh` plus this package, under the
transformers vLLM pins), where `tests/test_engines*.py` and the core, front and trainer tests
run; `tests/test_vllm_venv.py` runs them there from the main one.
"""

import importlib.util

collect_ignore = []
if importlib.util.find_spec("vllm") is None:
    # A vLLM plugin (it subclasses vLLM's LogitsProcessor), and the tests of the engines.
    collect_ignore += [
        "optimal_sampling/engines/processor.py",
        "tests/test_engines.py",
        "tests/test_engines_cli.py",
        "tests/test_engines_pipeline.py",
        "tests/test_engines_trainer.py",
    ]
else:
    collect_ignore += ["tests/test_vllm_venv.py"]
if importlib.util.find_spec("trl") is None:
    # The trainers' doctests need TRL (the `[trl]` extra); `optimal_sampling` is collected for its doctests.
    collect_ignore += ["optimal_sampling/trainers"]
