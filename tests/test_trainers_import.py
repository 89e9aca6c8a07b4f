"""Where the trainers live: `optimal_sampling.trainers`, the only subpackage that imports TRL.

Each check runs in a fresh interpreter: whether TRL gets imported, and the one-time warning of the
deprecated top-level `trainers` name, depend on what the process imported before.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Makes `trl` look uninstalled, as in an environment without the `[trl]` extra.
HIDE_TRL = """
import importlib.abc, sys

class HideTRL(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "trl" or name.startswith("trl."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, HideTRL())
"""


def run_python(code: str) -> dict:
    """Run `code` in a fresh interpreter at the repository root; it prints one JSON object last."""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_core_imports_without_trl():
    """Every module of the package outside `optimal_sampling.trainers` imports with TRL hidden (modules
    that need another optional package, e.g. vLLM, may fail for that package, never for TRL)."""
    result = run_python(
        HIDE_TRL
        + """
import importlib, json, pkgutil
import optimal_sampling

outcome = {}
for info in pkgutil.walk_packages(optimal_sampling.__path__, "optimal_sampling."):
    if info.name.startswith("optimal_sampling.trainers"):
        continue
    try:
        importlib.import_module(info.name)
        outcome[info.name] = "ok"
    except ModuleNotFoundError as error:
        outcome[info.name] = error.name
print(json.dumps({"outcome": outcome, "trl_loaded": "trl" in sys.modules}))
"""
    )
    outcome = result["outcome"]
    assert outcome["optimal_sampling.generation"] == "ok" and outcome["optimal_sampling.cli"] == "ok"
    assert not [name for name, missing in outcome.items() if missing == "trl"]
    assert not result["trl_loaded"]


@pytest.mark.parametrize("module", ["optimal_sampling.trainers", "trainers"])
def test_the_trainers_without_trl_say_how_to_install_them(module):
    result = run_python(
        HIDE_TRL
        + f"""
import json, warnings
warnings.simplefilter("ignore", DeprecationWarning)
try:
    import {module}
    print(json.dumps({{"error": None}}))
except ImportError as error:
    print(json.dumps({{"error": str(error), "type": type(error).__name__}}))
"""
    )
    assert result["error"] is not None, f"`import {module}` should fail without TRL"
    assert "pip install 'optimal-sampling[trl]'" in result["error"]
    assert "No module named 'trl'" in result["error"]  # the cause, kept


def test_the_old_top_level_name_warns_and_is_the_new_package():
    pytest.importorskip("trl")
    result = run_python(
        """
import json, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import trainers
    from trainers.rollout import sample_rollouts
    import trainers._common as common
import optimal_sampling.trainers as new
import optimal_sampling.trainers.rollout as rollout

deprecations = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
print(json.dumps({
    "deprecations": deprecations,
    "same_names": sorted(name for name in new.__all__ if getattr(trainers, name) is getattr(new, name)),
    "all": sorted(new.__all__),
    "old_all": sorted(trainers.__all__),
    "same_modules": common is new._common and trainers.rollout is rollout,
    "same_function": sample_rollouts is rollout.sample_rollouts,
}))
"""
    )
    [message] = [m for m in result["deprecations"] if "trainers" in m]
    assert "optimal_sampling.trainers" in message
    assert result["same_names"] == result["all"] == result["old_all"]
    assert result["same_modules"] and result["same_function"]
