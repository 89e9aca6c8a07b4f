"""Collection rules for the whole repository (doctests of `optimal_sampling` included).

vLLM 0.32 pins transformers<5.20 and the transformers front needs 5.24, so the suite runs in
two environments: the main one (everything but the engine tests) and the vLLM one
(`.ci/install_vllm.sh` plus this package), where `tests/test_engines*.py` run;
`tests/test_vllm_venv.py` runs them there from the main one.
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
