"""Collection rules for the whole repository (doctests of `optimal_sampling` included).

The suite runs in two environments: the main one (everything but the engine tests, under the
newest transformers) and the vLLM one (`.ci/install_vllm.sh` plus this package, under the
transformers vLLM pins), where `tests/test_engines*.py` and the core, front and trainer tests
run; `tests/test_vllm_venv.py` runs them there from the main one.
"""

import importlib.util


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


collect_ignore = []
if not _has_module("vllm.v1.sample.logits_processor"):  # vLLM absent, or 0.34+ (no V1 model runner)
    collect_ignore.append("optimal_sampling/engines/processor.py")
if not _has_module("vllm.v1.worker.gpu.sample.logits_processor"):
    collect_ignore.append("optimal_sampling/engines/processor_v2.py")
if importlib.util.find_spec("vllm") is None:
    # The vLLM plugins (they subclass vLLM's LogitsProcessor classes), and the tests of the engines.
    collect_ignore += [
        "tests/test_engines.py",
        "tests/test_engines_cli.py",
        "tests/test_engines_pipeline.py",
        "tests/test_engines_trainer.py",
        "tests/test_vllm_weight_transfer.py",
    ]
else:
    collect_ignore += ["tests/test_vllm_venv.py"]
if importlib.util.find_spec("trl") is None:
    # The trainers' doctests need TRL (the `[trl]` extra); `optimal_sampling` is collected for its doctests.
    collect_ignore += ["optimal_sampling/trainers"]
