"""Every ```python and ```bash block of README.md runs as written, in the order a reader meets it.

- Python blocks run in order in one namespace, as in a notebook: a block may use what an
  earlier one defined. Their working directory is the scratch copy below.
- Bash blocks run in order with `bash -e` in one working directory, a scratch copy of the
  repository (so files they write land there, and `pip install -e .` installs that copy), with
  a scratch venv first on PATH that sees this test environment's packages: `pip install` runs as
  written without touching the environment under test.
- Running one block runs the earlier blocks of its language first (once per session).

Markers (an HTML comment on the line before a block's fence):
- `<!-- ci:test-command -->`, `<!-- ci:servers -->`: CI runs this block itself (`.ci/run`
  extracts it by its marker and runs it with bash: the servers command before the tests, the
  test command as the test run). The test here checks that `.ci/run` extracts exactly this block.
- `<!-- readme-test: {"servers": true} -->`: the block needs the two vLLM servers (started by the
  `ci:servers` block); its URLs http://127.0.0.1:8000 / :8001 are pointed at the running servers.
  Without servers it is left out (failed under CI), so later blocks must not depend on it.
- `<!-- readme-test: {"vllm": true} -->`: a self-contained Python block that needs `vllm` (the
  in-process engines): it runs as a script (`python -c`) in the vLLM venv that
  `tests/test_vllm_venv.py` uses. Without one it is left out (failed under CI).
- `<!-- readme-test: {"core_install": true} -->`: a bash block that must run after the quick start's
  `pip install -e .` alone: the optional packages of the extras (`OPTIONAL_PACKAGES`: pyarrow,
  datasets) are made unimportable in its Python processes, as they are on such an install.
- `<!-- readme-test: {"replace": {"old": "new", ...}} -->`: text replaced before the block runs,
  for what cannot run here as written (a Hub model, a GPU). `new` may use {toy_base},
  {toy_teacher} (the shipped pair's directories) and {toy_problems} (a .jsonl of 16 toy problems
  with columns prompt, teacher_prompt, answer, in the working directory).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest
from readme_blocks import fenced_blocks

REPO = Path(__file__).resolve().parent.parent
BLOCKS = fenced_blocks((REPO / "README.md").read_text())
RUN_BY_CI = ("ci:test-command", "ci:servers")
#: What `pip install -e .` does not bring (the `[datasets]` extra does): hidden from `core_install` blocks.
OPTIONAL_PACKAGES = ("pyarrow", "pyarrow.parquet", "datasets")
EXECUTED = [b for b in BLOCKS if b.language in ("python", "bash") and b.marker not in RUN_BY_CI]


def test_every_code_block_is_python_or_bash():
    """Other names for shell or Python blocks would slip past the runner below."""
    assert {b.language for b in BLOCKS} <= {"python", "bash", ""}, sorted({b.language for b in BLOCKS})


@pytest.mark.parametrize("marker", RUN_BY_CI)
def test_ci_runs_the_blocks_marked_for_it(marker):
    [block] = [b for b in BLOCKS if b.marker == marker]
    script = (REPO / ".ci" / "run").read_text()
    function = script[script.index("readme_block() {") : script.index("\n}\n", script.index("readme_block() {")) + 3]
    extracted = subprocess.run(
        ["bash", "-c", f"{function}\nreadme_block {marker}"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    assert extracted.strip() == block.code.strip()
    variable = {"ci:test-command": "TEST_COMMAND", "ci:servers": "SERVERS_COMMAND"}[marker]
    assert f"{variable}=$(readme_block {marker})" in script and f'bash -c "${variable}"' in script


# -- the runner ----------------------------------------------------------------------------


class Reader:
    """Runs README blocks in order, in the scratch repository copy and venv, keeping state."""

    def __init__(self, work: Path, servers: dict | None):
        self.work, self.repo, self.servers = work, work / "repo", servers
        self.namespace: dict = {"__name__": "__readme__"}
        self.done: set[int] = set()
        self.failed: int | None = None
        shutil.copytree(
            REPO,
            self.repo,
            ignore=shutil.ignore_patterns(
                ".git", ".venv*", "__pycache__", "*.egg-info", "build", ".pytest_cache", "vllm_servers.env"
            ),
        )
        self._make_venv(work / "venv")
        self._write_toy_problems()

    def _make_venv(self, path: Path) -> None:
        venv.create(path, with_pip=True)
        self.venv = path
        site = subprocess.run(
            [str(path / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
        Path(site, "_readme_test_env.pth").write_text("".join(p + "\n" for p in sorted(ours)))

    def _core_install_site(self) -> Path:
        """A directory whose `sitecustomize` makes `OPTIONAL_PACKAGES` unimportable (Python imports it
        at start-up from PYTHONPATH), as on an install without the extras."""
        site = self.work / "core_install"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(
            f"import sys\nfor _name in {OPTIONAL_PACKAGES!r}:\n    sys.modules[_name] = None\n"
        )
        return site

    def _write_toy_problems(self) -> None:
        from optimal_sampling.toy import make_problems

        rows = make_problems(16, seed=0)
        (self.repo / "toy_problems.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def source(self, block) -> str:
        from optimal_sampling.toy import BASE_DIR, TEACHER_DIR

        code = block.code
        values = {
            "toy_base": str(BASE_DIR),
            "toy_teacher": str(TEACHER_DIR),
            "toy_problems": str(self.repo / "toy_problems.jsonl"),
        }
        for old, new in block.options.get("replace", {}).items():
            assert old in code, f"the marker replaces {old!r}, which the block does not contain"
            code = code.replace(old, new.format(**values))
        if block.options.get("servers"):
            code = code.replace("http://127.0.0.1:8000", self.servers["OPTIMAL_SAMPLING_THETA_URL"])
            code = code.replace("http://127.0.0.1:8001", self.servers["OPTIMAL_SAMPLING_T_URL"])
        return code

    def run_through(self, block) -> None:
        """Run the earlier blocks of `block`'s language that are not server blocks, then `block`."""
        index = EXECUTED.index(block)
        earlier = [
            i
            for i, b in enumerate(EXECUTED[:index])
            if b.language == block.language and not b.options.get("servers") and not b.options.get("vllm")
        ]
        for i in [*earlier, index]:
            if i in self.done:
                continue
            if self.failed is not None:
                pytest.fail(f"an earlier README block ({EXECUTED[self.failed].name}) failed")
            try:
                self._run(EXECUTED[i])
            except BaseException:
                self.failed = i
                raise
            self.done.add(i)

    def _run(self, block) -> None:
        code = self.source(block)
        if block.language == "python":
            previous = os.getcwd()
            os.chdir(self.repo)
            try:
                exec(compile(code, f"README.md:{block.line}", "exec"), self.namespace)
            finally:
                os.chdir(previous)
            return
        env = {
            **os.environ,
            "VIRTUAL_ENV": str(self.venv),
            "PATH": os.pathsep.join([str(self.venv / "bin"), str(Path(sys.executable).parent), os.environ["PATH"]]),
        }
        if block.options.get("core_install"):
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(self._core_install_site()), env.get("PYTHONPATH")]))
        result = subprocess.run(
            ["bash", "-e", "-o", "pipefail", "-c", code],
            cwd=self.repo,
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert result.returncode == 0, (
            f"README.md:{block.line} exited with {result.returncode}\n"
            f"--- stdout ---\n{result.stdout[-3000:]}\n--- stderr ---\n{result.stderr[-3000:]}"
        )


@pytest.fixture(scope="module")
def reader(tmp_path_factory):
    return Reader(tmp_path_factory.mktemp("readme"), servers=None)


@pytest.mark.parametrize(
    "block", [b for b in EXECUTED if not b.options.get("servers") and not b.options.get("vllm")], ids=lambda b: b.name
)
def test_readme_block_runs_as_written(block, reader):
    reader.run_through(block)


@pytest.mark.parametrize("block", [b for b in EXECUTED if b.options.get("servers")], ids=lambda b: b.name)
def test_readme_server_block_runs_against_the_servers(block, reader, servers):
    reader.servers = servers
    reader.run_through(block)


@pytest.mark.parametrize("block", [b for b in EXECUTED if b.options.get("vllm")], ids=lambda b: b.name)
def test_readme_vllm_block_runs_in_the_vllm_venv(block, reader):
    from test_vllm_venv import IN_CI, vllm_venv

    venv = vllm_venv()
    if venv is None:
        hint = (
            "no vLLM venv: start the servers with `python tests/vllm_servers.py up`, or set OPTIMAL_SAMPLING_VLLM_VENV"
        )
        if IN_CI:
            pytest.fail(f"CI must run the README's vLLM blocks, but {hint}")
        pytest.skip(hint)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-c", reader.source(block)],
        cwd=reader.repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, (
        f"README.md:{block.line} exited with {result.returncode}\n"
        f"--- stdout ---\n{result.stdout[-3000:]}\n--- stderr ---\n{result.stderr[-3000:]}"
    )


def test_the_quick_start_says_how_to_get_the_cpu_build_of_torch():
    """A plain `pip install torch` (or installing the package first) brings the ~3 GB CUDA build;
    PyTorch documents its CPU wheel index for machines without a GPU. CI keeps its local wheel."""
    text = (REPO / "README.md").read_text()
    quick_start = text[text.index("## Quick start") : text.index("### The shipped toy pair")]
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in quick_start
    assert quick_start.index("index-url") < quick_start.index("pip install -e .")  # torch first
    assert "pip install --quiet torch==2.13.0" in (REPO / ".ci" / "run").read_text()


# -- what the main-job section promises ------------------------------------------------------


def main_job_section() -> str:
    text = (REPO / "README.md").read_text()
    return text[text.index("### The main job") : text.index("## Training with TRL")]


def test_the_main_job_block_runs_on_the_core_install():
    """Its outputs must not need pyarrow or datasets, which the quick start's install does not bring."""
    [block] = [b for b in BLOCKS if "optimal-sampling generate --base" in b.code]
    assert block.options.get("core_install") is True
    assert ".parquet" not in block.code and "--output my_samples.jsonl" in block.code


def test_the_main_job_teacher_template_is_the_format_the_toy_teacher_was_trained_on():
    """`--teacher-prompt-template $'...'` (bash's ANSI-C quoting) formats a question into exactly
    the toy teacher's chat prompt; the toy pair answers nothing else (a hint in another format
    made the teacher worse than the base)."""
    import re

    from optimal_sampling.toy import format_teacher_prompt

    [block] = [b for b in BLOCKS if "optimal-sampling generate --base" in b.code]
    quoted = re.search(r"--teacher-prompt-template \$'((?:[^'\\]|\\.)*)'", block.code).group(1)
    template = quoted.encode().decode("unicode_escape")
    assert template.format(question="12+34=") == format_teacher_prompt("12+34=")


def test_every_per_row_diagnostic_and_the_settings_file_are_explained():
    """A row's `diagnostics` keys, as the sampler writes them, each named in the main-job section, and
    the `.settings.json` file the command writes beside its output."""
    from optimal_sampling import OptimalSampler
    from optimal_sampling.toy import load_toy_pair

    base, teacher, tokenizer = load_toy_pair()
    [sample] = OptimalSampler(base, teacher, tokenizer).generate(["12+34="], max_new_tokens=3, seed=0)
    section = main_job_section()
    missing = [key for key in sample.diagnostics if f"`{key}`" not in section]
    assert not missing, f"per-row diagnostics the README does not explain: {missing}"
    assert "arithmetic" in section and "`OUTPUT.settings.json`" in section
