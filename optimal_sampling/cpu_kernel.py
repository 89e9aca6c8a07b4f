"""The q* step for float32 CPU tensors as two C functions (`csrc/q_star_cpu.c`).

`kl_symmetry_cpu` is the KL-symmetric α solve: the algorithm of the Triton kernel
(`optimal_sampling.kernels`), one row at a time — one pass over a row for its statistics
and both bracket ends, then one pass per Newton iteration, the sums kept in registers.
`mixture_cpu` is log q* at that α and the four per-row moments every diagnostic comes from
(`mixture.diagnostics_from_moments`), in three passes. `compute_mixture` uses both for
float32 CPU rows. On the tiny pair `benchmarks/generate_speed.py` measures ([8, 4096] per
token) the batched torch ops cost as much as a model's forward: their passes write and
re-read `[B, 6, V]` temporaries, and the per-row bookkeeping is dozens of small ops;
`benchmarks/q_star_step.py` times the two.

The source is compiled on first use with the system C compiler (`$CC`, else `cc`, `gcc`
or `clang`) into a per-machine cache (`$OPTIMAL_SAMPLING_CACHE`, else
`~/.cache/optimal_sampling`) and loaded with ctypes; later processes reuse the library.
Without a compiler the torch ops run, after one warning. `OPTIMAL_SAMPLING_CPU_KERNEL=0`
turns the C step off. Large batches are split by rows over up to `torch.get_num_threads()`
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

SOURCE = Path(__file__).with_name("csrc") / "q_star_cpu.c"
# No fast-math: ±inf and NaN must keep their IEEE meaning.
FLAGS = ("-O3", "-fPIC", "-shared", "-pthread", "-fno-trapping-math", "-fno-math-errno")
# Rows go to threads (up to torch.get_num_threads()) only with at least this many tokens per
# thread: starting a thread costs ~20-50 µs, a pass over 64k tokens about as much.
TOKENS_PER_THREAD = 1 << 16
NATIVE = ("-march=native",)


class CompilerError(RuntimeError):
    """The C q* step could not be built (no compiler, or it failed): torch ops run instead."""


def enabled() -> bool:
    return os.environ.get("OPTIMAL_SAMPLING_CPU_KERNEL", "1") != "0"


def cpu_kernel_applies(x: torch.Tensor) -> bool:
    """Whether the C q* step takes these rows: CPU tensors of a dtype computed in float32
    (float32, and bf16 / fp16, which are upcast first) outside torch.compile, the C step not
    switched off, and its library built (the first call builds it). float64 rows keep the
    torch ops, which compute them in float64."""
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
    """The loaded C library, built on first use; None (after one warning) when it cannot be."""
    compiler = find_compiler()
    try:
        if compiler is None:
            raise CompilerError("no C compiler found (looked for $CC, cc, gcc, clang)")
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
        key = hashlib.sha256(
            "\0".join(
                [SOURCE.read_text(), " ".join(FLAGS + NATIVE), compiler, version, _cpu_identity(), sys.platform]
            ).encode()
        ).hexdigest()[:16]
        target = cache_dir() / f"q_star_cpu-{key}.so"
        if not target.exists():
            build(compiler, target)
        lib = ctypes.CDLL(str(target))
    except (CompilerError, OSError) as error:
        warnings.warn(
            "optimal_sampling: the C q* step for CPU tensors could not be built, so the slower "
            f"torch ops run instead ({error}). Install a C compiler (e.g. `apt install gcc`), "
            "point OPTIMAL_SAMPLING_CACHE at a writable directory if the cache is not, or set "
            "OPTIMAL_SAMPLING_CPU_KERNEL=0 to silence this.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    pointer, i64, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
    lib.kl_symmetry_rows.argtypes = [
        pointer,
        pointer,
        i64,
        i64,
        i64,
        i64,
        f64,
        f64,
        ctypes.c_int32,
        f64,
        f64,
        f64,
        f64,
        pointer,
        pointer,
        pointer,
        pointer,
        pointer,
        ctypes.c_int32,
    ]
    lib.kl_symmetry_rows.restype = None
    lib.mixture_rows.argtypes = [
        pointer,
        pointer,
        i64,
        i64,
        i64,
        i64,
        pointer,
        pointer,
        i64,
        ctypes.c_int32,
        pointer,
        i64,
        pointer,
        ctypes.c_int32,
    ]
    lib.mixture_rows.restype = None
    return lib


def _loaded() -> ctypes.CDLL:
    lib = library()
    if lib is None:
        raise CompilerError("the C q* step is not available (see the warning above)")
    return lib


def _float32_rows(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The inputs as float32 CPU rows with unit stride along the vocabulary."""
    if any(x.dtype != torch.float32 or x.device.type != "cpu" for x in tensors):
        raise TypeError("the C q* step takes float32 CPU tensors")
    return [x if x.stride(-1) == 1 else x.contiguous() for x in tensors]


def _threads(batch: int, width: int, threads: int | None) -> int:
    if threads is None:
        threads = min(torch.get_num_threads(), batch * width // TOKENS_PER_THREAD)
    return max(1, int(threads))


def kl_symmetry_cpu(
    logp_theta: torch.Tensor,
    logp_t: torch.Tensor,
    tol: float,
    max_iter: int,
    *,
    fallback: float = 1.0,
    alpha_min: float = 0.0,
    alpha_max: float = 1.0,
    threads: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Solve every row of a float32 CPU `[B, V]` pair: the fields of `alpha.AlphaSolution`
    (α, iterations, degenerate, empty support, converged) as `[B]` tensors, exactly as
    `kernels.kl_symmetry_kernel` returns them. `threads` (default: `torch.get_num_threads()`,
    fewer when there are fewer than TOKENS_PER_THREAD tokens for each) only changes the speed:
    each row is solved the same way on any thread."""
    from .options import DEGENERATE_RTOL, QUADRATIC_STEP  # the same tests as the other paths

    lib = _loaded()
    logp_theta, logp_t = _float32_rows(logp_theta, logp_t)
    batch, width = logp_theta.shape
    alpha = torch.empty(batch, dtype=torch.float32)
    iterations = torch.empty(batch, dtype=torch.int32)
    flags = torch.empty(3, batch, dtype=torch.int8)  # degenerate, empty, converged
    if batch:
        lib.kl_symmetry_rows(
            logp_theta.data_ptr(),
            logp_t.data_ptr(),
            logp_theta.stride(0),
            logp_t.stride(0),
            batch,
            width,
            float(tol),
            QUADRATIC_STEP,
            int(max_iter),
            DEGENERATE_RTOL,
            float(fallback),
            float(alpha_min),
            float(alpha_max),
            alpha.data_ptr(),
            iterations.data_ptr(),
            flags[0].data_ptr(),
            flags[1].data_ptr(),
            flags[2].data_ptr(),
            _threads(batch, width, threads),
        )
    degenerate, empty, converged = flags.view(torch.bool).unbind(0)
    return alpha, iterations, degenerate, empty, converged


def mixture_cpu(
    logp_theta: torch.Tensor,
    logp_t: torch.Tensor,
    alpha: torch.Tensor,
    *,
    log_multiplicity: torch.Tensor | None = None,
    empty_support: str = "teacher",
    threads: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log q_α (`[B, V]` float32, −inf off the common support; the fallback model's row on a
    row without a common token) and `[B, 4]` float64 moments per row: the log-partition
    A(α), E_q[Δ], H(q) and A(−α) − A(2 − α) — what `mixture.mixture_on_support` and
    `mixture.diagnostics_on_support` compute with torch ops. `log_multiplicity` (`[B, V]`, the
    sparse path's column sizes) enters the entropy only, as there."""
    lib = _loaded()
    logp_theta, logp_t = _float32_rows(logp_theta, logp_t)
    if log_multiplicity is not None:
        (log_multiplicity,) = _float32_rows(log_multiplicity.to(torch.float32))
    batch, width = logp_theta.shape
    alpha = alpha.to(torch.float32).contiguous()
    logq = torch.empty(batch, width, dtype=torch.float32)
    moments = torch.empty(batch, 4, dtype=torch.float64)
    if batch:
        lib.mixture_rows(
            logp_theta.data_ptr(),
            logp_t.data_ptr(),
            logp_theta.stride(0),
            logp_t.stride(0),
            batch,
            width,
            alpha.data_ptr(),
            None if log_multiplicity is None else log_multiplicity.data_ptr(),
            0 if log_multiplicity is None else log_multiplicity.stride(0),
            int(empty_support == "teacher"),
            logq.data_ptr(),
            logq.stride(0),
            moments.data_ptr(),
            _threads(batch, width, threads),
        )
    return logq, moments
