"""The C q* step for CPU tensors (`optimal_sampling/cpu_kernel.py`, `csrc/q_star_cpu.c`).

Its accuracy, flags and options are checked in `tests/test_alpha.py`, which runs every
KL-symmetry test on both CPU solvers. Here: what is particular to the C code — rows whose
width is not a multiple of its lanes or chunks, strided rows, which inputs it takes — and
how it is built: into the cache directory, once, and with a clear warning and the torch
path when no compiler can build it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from optimal_sampling import compute_mixture, cpu_kernel, solve_alpha
from optimal_sampling.alpha import solver_backend

sys.path.insert(0, str(Path(__file__).parent))
from test_alpha import ref_kl_symmetric_alpha, require_c_solver, stacked_pairs  # noqa: E402


@pytest.fixture(autouse=True)
def c_solver(monkeypatch):
    monkeypatch.setenv("OPTIMAL_SAMPLING_CPU_KERNEL", "1")
    require_c_solver()


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """An empty cache directory and no library loaded in this process; afterwards the
    normal library is loaded again."""
    monkeypatch.setenv("OPTIMAL_SAMPLING_CACHE", str(tmp_path / "cache"))
    cpu_kernel.library.cache_clear()
    yield tmp_path / "cache"
    monkeypatch.undo()
    cpu_kernel.library.cache_clear()


# Widths around the C code's 8 lanes and 1,024-token chunks: shorter than one vector, one
# chunk plus a partial vector, several chunks plus a partial chunk.
@pytest.mark.parametrize("vocab", [3, 1003, 5001])
def test_rows_of_any_width_solve_to_the_float64_root(vocab):
    lp, lr = stacked_pairs(seed=vocab, rows_per_setting=3, vocab=vocab)
    solution = solve_alpha(lp, lr, return_info=True)
    reference = ref_kl_symmetric_alpha(lp.double().numpy(), lr.double().numpy())
    assert np.abs(solution.alpha.double().numpy() - reference).max() <= 1e-6
    assert bool(solution.converged.all()) and int(solution.iterations.max()) <= 8


def test_strided_rows_give_the_same_step_as_contiguous_ones():
    """The processor slices both models' logits to the shared vocabulary: rows whose stride
    is larger than their width."""
    lp, lr = stacked_pairs(seed=2, rows_per_setting=2, vocab=1003)
    wide_p = torch.full((lp.shape[0], 1100), float("-inf"))
    wide_r = torch.zeros((lr.shape[0], 1100))  # garbage beyond the width must not be read
    wide_p[:, :1003], wide_r[:, :1003] = lp, lr
    strided = cpu_kernel.kl_symmetry_cpu(wide_p[:, :1003], wide_r[:, :1003], 1e-6, 20)
    contiguous = cpu_kernel.kl_symmetry_cpu(lp, lr, 1e-6, 20)
    for a, b in zip(strided, contiguous):
        assert torch.equal(a, b)
    alpha = contiguous[0]
    strided = cpu_kernel.mixture_cpu(wide_p[:, :1003], wide_r[:, :1003], alpha)
    contiguous = cpu_kernel.mixture_cpu(lp, lr, alpha)
    for a, b in zip(strided, contiguous):
        assert torch.equal(a, b)


@pytest.mark.parametrize("threads", [2, 5, 64])
def test_rows_split_over_threads_give_exactly_the_step_of_one_thread(threads):
    lp, lr = stacked_pairs(seed=9, rows_per_setting=2, vocab=1003)  # 24 rows: 64 threads get one row or none
    one = cpu_kernel.kl_symmetry_cpu(lp, lr, 1e-6, 20, threads=1)
    split = cpu_kernel.kl_symmetry_cpu(lp, lr, 1e-6, 20, threads=threads)
    for a, b in zip(split, one):
        assert torch.equal(a, b)
    one = cpu_kernel.mixture_cpu(lp, lr, one[0], threads=1)
    split = cpu_kernel.mixture_cpu(lp, lr, split[0], threads=threads)
    for a, b in zip(split, one):
        assert torch.equal(a, b)


def test_float32_cpu_rows_take_the_c_step_and_the_rest_the_torch_ops(monkeypatch):
    import optimal_sampling.mixture as mixture_module

    lp, lr = stacked_pairs(seed=4, rows_per_setting=1, vocab=100)
    assert solver_backend(lp) == solver_backend(lp.bfloat16()) == "c"
    assert solver_backend(lp.double()) == "torch"  # float64 rows are solved in float64
    calls = []
    for module, name in ((cpu_kernel, "kl_symmetry_cpu"), (mixture_module, "mixture_cpu")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k))
    compute_mixture(lp, lr)
    assert calls == ["kl_symmetry_cpu", "mixture_cpu"]
    compute_mixture(lp.double(), lr.double())
    compute_mixture(lp, lr, alpha_method="fixed", alpha=0.3)
    assert len(calls) == 2
    monkeypatch.setenv("OPTIMAL_SAMPLING_CPU_KERNEL", "0")
    assert solver_backend(lp) == "torch"
    compute_mixture(lp, lr)
    assert len(calls) == 2


def _top_k_step_lists(seed: int, rows: int = 16, vocab: int = 300, k: int = 12):
    """Two models' top-k lists (float64, as both vLLM backends hold them) of random rows."""
    generator = torch.Generator().manual_seed(seed)
    p = torch.log_softmax(torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * 2, -1)
    r = torch.log_softmax(torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * 2, -1)
    (lp, ip), (lr, ir) = p.topk(k), r.topk(k)
    return ip, lp, ir, lr, vocab


def test_the_rest_buckets_multiplicity_enters_the_c_steps_entropy_as_the_torch_paths():
    """A column that stands for m tokens adds q·log m to H(q) and changes nothing else."""
    from optimal_sampling.mixture import compute_mixture
    from optimal_sampling.sparse import sparse_candidates

    ids_theta, lp_theta, ids_t, lp_t, vocab = _top_k_step_lists(seed=3)
    c = sparse_candidates(ids_theta, lp_theta, ids_t, lp_t, vocab)
    lp, lr, lm = c.logp_theta.float(), c.logp_t.float(), c.log_multiplicity.float()
    assert bool((lm[:, -1] > 0).all()) and bool(torch.isinf(lm[:, :-1]).any())  # a bucket, and empty columns
    alpha = cpu_kernel.kl_symmetry_cpu(lp, lr, 1e-6, 20)[0]
    logq, moments = cpu_kernel.mixture_cpu(lp, lr, alpha, log_multiplicity=lm)
    plain_logq, plain = cpu_kernel.mixture_cpu(lp, lr, alpha)
    assert torch.equal(logq, plain_logq) and torch.equal(moments[:, [0, 1, 3]], plain[:, [0, 1, 3]])
    q = logq.double().exp()
    expected_entropy = -(q * torch.where(q > 0, logq.double() - lm.double(), 0.0)).sum(-1)
    torch.testing.assert_close(moments[:, 2], expected_entropy, atol=1e-5, rtol=0)
    assert bool((moments[:, 2] > plain[:, 2] + 1e-3).all())  # the bucket's tokens spread its mass
    torch_step = compute_mixture(c.logp_theta, c.logp_t, log_multiplicity=c.log_multiplicity)  # float64: torch ops
    c_step = compute_mixture(lp, lr, log_multiplicity=lm)
    torch.testing.assert_close(c_step.alpha.double(), torch_step.alpha.double(), atol=1e-6, rtol=0)
    for name, value in torch_step.diagnostics.as_dict().items():
        torch.testing.assert_close(getattr(c_step.diagnostics, name), value, atol=1e-4, rtol=0, msg=name)


def test_the_top_k_step_of_both_vllm_backends_runs_in_c(monkeypatch):
    import optimal_sampling.mixture as mixture_module
    from optimal_sampling.options import QStarOptions
    from optimal_sampling.topk_decoding import mix_top_k

    calls = []
    for module, name in ((cpu_kernel, "kl_symmetry_cpu"), (mixture_module, "mixture_cpu")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k))
    ids_theta, lp_theta, ids_t, lp_t, vocab = _top_k_step_lists(seed=5)
    step = mix_top_k(ids_theta, lp_theta, ids_t, lp_t, vocab_size=vocab, q_star=QStarOptions())
    assert calls == ["kl_symmetry_cpu", "mixture_cpu"]
    assert bool(step.mixture.diagnostics.kl_diff.abs().max() < 1e-4)  # still the KL-symmetric point


def test_the_library_is_built_into_the_cache_directory_once(fresh_build):
    lib = cpu_kernel.library()
    assert lib is not None
    built = list(fresh_build.glob("q_star_cpu-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    cpu_kernel.library.cache_clear()  # a new process: finds the library, does not rebuild it
    assert cpu_kernel.library() is not None
    assert built[0].stat().st_mtime_ns == stamp and list(fresh_build.glob("*")) == built
    lp, lr = stacked_pairs(seed=6, rows_per_setting=1, vocab=50)
    reference = ref_kl_symmetric_alpha(lp.double().numpy(), lr.double().numpy())
    assert np.abs(solve_alpha(lp, lr).double().numpy() - reference).max() <= 1e-6


def test_without_a_compiler_the_torch_path_solves_after_one_clear_warning(fresh_build, monkeypatch):
    monkeypatch.setattr(cpu_kernel, "find_compiler", lambda: None)
    lp, lr = stacked_pairs(seed=8, rows_per_setting=1, vocab=50)
    with pytest.warns(RuntimeWarning, match=r"no C compiler found.*Install a C compiler"):
        assert solver_backend(lp) == "torch"
    reference = ref_kl_symmetric_alpha(lp.double().numpy(), lr.double().numpy())
    assert np.abs(solve_alpha(lp, lr).double().numpy() - reference).max() <= 1e-6
    assert np.abs(compute_mixture(lp, lr).alpha.double().numpy() - reference).max() <= 1e-6


def test_a_failing_compiler_is_reported_with_its_own_error(fresh_build, monkeypatch, tmp_path):
    broken = tmp_path / "broken-cc"
    broken.write_text("#!/bin/sh\necho 'cc: error: this compiler is broken' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setattr(cpu_kernel, "find_compiler", lambda: str(broken))
    with pytest.warns(RuntimeWarning, match="this compiler is broken"):
        assert cpu_kernel.library() is None
    assert not list(fresh_build.glob("*.so"))  # no half-written library left behind
