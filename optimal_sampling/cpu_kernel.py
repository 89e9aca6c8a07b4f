"""The KL-symmetric α solve for CPU tensors as one C function (`csrc/kl_symmetry_cpu.c`).

The same algorithm as the Triton kernel (`optimal_sampling.kernels`), for CPU tensors:
one pass over a row for its statistics and both bracket ends, then one pass per Newton
iteration, the sums kept in registers. On the tiny pair `benchmarks/generate_speed.py`
measures ([8, 4096] per token) the batched torch solve costs as much as a model's
forward: its passes write and re-read `[B, 6, V]` temporaries and its per-row bookkeeping
is dozens of small ops; `benchmarks/q_star_step.py` times the two.

The source is compiled on first use with the system C compiler (`$CC`, else `cc`, `gcc`
or `clang`) into a per-machine cache (`$OPTIMAL_SAMPLING_CACHE`, else
`~/.cache/optimal_sampling`) and loaded with ctypes; later processes reuse the library.
Without a compiler the torch path solves, after one warning. `OPTIMAL_SAMPLING_CPU_KERNEL=0`
turns the C solve off. Large batches are split by rows over up to `torch.get_num_threads()`
threads; small ones (a decoding step of a few rows) run on the calling thread. ctypes
releases the GIL during the call.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "kl_symmetry_cpu.c"
# No fast-math: ±inf and NaN must keep their IEEE meaning.
FLAGS = ("-O3", "-fPIC", "-shared", "-pthread", "-fno-trapping-math", "-fno-math-errno")
# Rows go to threads (up to torch.get_num_threads()) only with at least this many tokens per
# thread: starting a thread costs ~20-50 µs, a pass over 64k tokens about as much.
TOKENS_PER_THREAD = 1 << 16
NATIVE = ("-march=native",)


class CompilerError(RuntimeError):
    """The C solve could not be built (no compiler, or it failed): the torch path solves."""


def enabled() -> bool:
    return os.environ.get("OPTIMAL_SAMPLING_CPU_KERNEL", "1") != "0"


def cpu_kernel_applies(x: torch.Tensor) -> bool:
    """Whether the C solve takes these rows: CPU tensors of a dtype solved in float32 (float32,
    and bf16 / fp16, which are upcast first) outside torch.compile, the C solve not switched
    off, and its library built (the first call builds it). float64 rows keep the torch path,
    which solves them in float64."""
    if not (enabled() and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float16, torch.bfloat16)):
        return False
    if torch.compiler.is_compiling():
        return False
    return library() is not None


def find_compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cache_dir() -> Path:
    root = os.environ.get("OPTIMAL_SAMPLING_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "optimal_sampling"


def _cpu_identity() -> str:
    """What `-march=native` depends on: the CPU's model and feature flags (Linux), else
    whatever the platform says."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags", "Features"))}))
    except OSError:
        return platform.processor() or platform.machine()


def build(compiler: str, target: Path) -> None:
    """Compile the source into `target` (atomically: parallel processes may race here).
    `-march=native` first; a compiler that rejects it gets the portable flags."""
    target.parent.mkdir(parents=True, exist_ok=True)
    errors = []
    for extra in (NATIVE, ()):
        fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        command = [compiler, *FLAGS, *extra, "-o", partial, str(SOURCE), "-lm"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode == 0:
            os.replace(partial, target)
            return
        os.unlink(partial)
        errors.append(f"$ {' '.join(command)}\n{done.stderr.strip()}")
    raise CompilerError("\n".join(errors))


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded C solve, built on first use; None (after one warning) when it cannot be."""
    compiler = find_compiler()
    try:
        if compiler is None:
            raise CompilerError("no C compiler found (looked for $CC, cc, gcc, clang)")
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
        key = hashlib.sha256("\0".join(
            [SOURCE.read_text(), " ".join(FLAGS + NATIVE), compiler, version, _cpu_identity(), sys.platform]
        ).encode()).hexdigest()[:16]
        target = cache_dir() / f"kl_symmetry_cpu-{key}.so"
        if not target.exists():
            build(compiler, target)
        lib = ctypes.CDLL(str(target))
    except (CompilerError, OSError) as error:
        warnings.warn(
            "optimal_sampling: the C α solve for CPU tensors could not be built, so the slower "
            f"torch path solves instead ({error}). Install a C compiler (e.g. `apt install gcc`), "
            "point OPTIMAL_SAMPLING_CACHE at a writable directory if the cache is not, or set "
            "OPTIMAL_SAMPLING_CPU_KERNEL=0 to silence this.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    pointer, i64, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
    lib.kl_symmetry_rows.argtypes = [pointer, pointer, i64, i64, i64, i64, f64, f64, ctypes.c_int32, f64, f64, f64, f64,
                                     pointer, pointer, pointer, pointer, pointer, ctypes.c_int32]
    lib.kl_symmetry_rows.restype = None
    return lib


def kl_symmetry_cpu(
    logp_theta: torch.Tensor, logp_t: torch.Tensor, tol: float, max_iter: int, *, fallback: float = 1.0,
    alpha_min: float = 0.0, alpha_max: float = 1.0, threads: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Solve every row of a float32 CPU `[B, V]` pair: the fields of `alpha.AlphaSolution`
    (α, iterations, degenerate, empty support, converged) as `[B]` tensors, exactly as
    `kernels.kl_symmetry_kernel` returns them. `threads` (default: `torch.get_num_threads()`,
    fewer when there are fewer than TOKENS_PER_THREAD tokens for each) only changes the speed:
    each row is solved the same way on any thread."""
    from .alpha import _DEGENERATE_RTOL, _QUADRATIC_STEP  # the same tests as the other paths

    lib = library()
    if lib is None:
        raise CompilerError("the C α solve is not available (see the warning above)")
    if logp_theta.dtype != torch.float32 or logp_t.dtype != torch.float32 or logp_theta.device.type != "cpu":
        raise TypeError("kl_symmetry_cpu takes float32 CPU tensors")
    if logp_theta.stride(-1) != 1:
        logp_theta = logp_theta.contiguous()
    if logp_t.stride(-1) != 1:
        logp_t = logp_t.contiguous()
    batch, width = logp_theta.shape
    alpha = torch.empty(batch, dtype=torch.float32)
    iterations = torch.empty(batch, dtype=torch.int32)
    flags = torch.empty(3, batch, dtype=torch.int8)  # degenerate, empty, converged
    if threads is None:
        threads = min(torch.get_num_threads(), batch * width // TOKENS_PER_THREAD)
    if batch:
        lib.kl_symmetry_rows(
            logp_theta.data_ptr(), logp_t.data_ptr(), logp_theta.stride(0), logp_t.stride(0), batch, width, float(tol),
            _QUADRATIC_STEP, int(max_iter), _DEGENERATE_RTOL, float(fallback), float(alpha_min), float(alpha_max),
            alpha.data_ptr(), iterations.data_ptr(), flags[0].data_ptr(), flags[1].data_ptr(), flags[2].data_ptr(),
            max(1, int(threads)),
        )
    degenerate, empty, converged = flags.view(torch.bool).unbind(0)
    return alpha, iterations, degenerate, empty, converged
