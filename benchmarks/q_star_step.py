"""Time of one q* step (`compute_mixture`) against the fixed-α mix a plain two-model loop does.

For each shape `[B, V]` the script draws related base / teacher log-prob pairs (the same
generator as `alpha_solver.py`: teacher logits = base logits + noise, float32) and times

  fixed-α mix            `log_softmax(0.5 · lp + 0.5 · lr)`: what `generate_speed.py`'s plain
                         two-model loop does per step, the floor of any mixing
  q* step, no diagnostics `compute_mixture(lp, lr, return_diagnostics=False)`: validation,
                         common support, the kl_symmetry α solve, log q*
  q* step                `compute_mixture(lp, lr)`: the same plus the diagnostics the
                         processor records per token (KLs, ESS ratio, entropy, Chernoff)
  q* step, inference mode the same under `torch.inference_mode()`, as the processor runs it
  q* step, torch ops      `compute_mixture` with the fused code switched off: on CPU the C q*
                         step (α solve, log q*, diagnostics), on CUDA the Triton α solve

Each row: `--warmup` untimed calls, then `--repeats` timed calls in blocks; the table shows
the median call and the fastest block's mean (on a shared machine the fastest block is the
steadier estimate of the code's own cost). On CUDA every timed call is followed by
`torch.cuda.synchronize()`, so the time is what the host waits for one step. The table is
printed and appended to benchmarks/RESULTS.md (and copied to $OUT when set).

    python benchmarks/q_star_step.py --device cpu --shapes 8x4096
    python benchmarks/q_star_step.py --device cuda --shapes 64x151936
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alpha_solver import make_pair  # noqa: E402
from generate_speed import environment, save, switched_off  # noqa: E402

from optimal_sampling import compute_mixture  # noqa: E402


def rows(lp: torch.Tensor, lr: torch.Tensor) -> dict:
    def inference_mode_step():
        with torch.inference_mode():
            return compute_mixture(lp, lr)

    # The fused code switched off (the C q* step on CPU, the Triton α solve on CUDA): torch ops.
    switch = "OPTIMAL_SAMPLING_TRITON" if lp.is_cuda else "OPTIMAL_SAMPLING_CPU_KERNEL"

    return {
        "fixed-α mix": lambda: torch.log_softmax(0.5 * lp + 0.5 * lr, dim=-1),
        "q* step, no diagnostics": lambda: compute_mixture(lp, lr, return_diagnostics=False),
        "q* step": lambda: compute_mixture(lp, lr),
        "q* step, inference mode": inference_mode_step,
        f"q* step, torch ops ({switch}=0)": lambda: switched_off(switch, compute_mixture, logp_theta=lp, logp_t=lr),
    }


def time_row(fn, device: str, warmup: int, repeats: int, block: int = 10) -> tuple[float, float]:
    """(median call, fastest block mean) in ms."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    calls, blocks = [], []
    for _ in range(max(1, repeats // block)):
        block_start = time.perf_counter()
        for _ in range(block):
            start = time.perf_counter()
            fn()
            sync()
            calls.append(time.perf_counter() - start)
        blocks.append((time.perf_counter() - block_start) / block)
    return 1000 * statistics.median(calls), 1000 * min(blocks)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--shapes", nargs="+", default=None, help="BxV, e.g. 8x4096 (default: 8x4096 on CPU, 64x151936 on CUDA)"
    )
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads on CPU (default 1)")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    shapes = args.shapes or (["8x4096"] if args.device == "cpu" else ["64x151936"])
    env = environment(args.device)
    lines = [
        f"### q_star_step on {env.get('gpu', 'CPU')} ({env['date']})",
        "",
        f"- command: `{env['command']}`",
        f"- machine: {env.get('gpu', 'no GPU')}; {env['cpu']}; torch.get_num_threads() = {env['threads']}",
        f"- versions: torch {env['torch']}, transformers {env['transformers']}, Python {env['python']}",
        f"- {args.repeats} timed calls per row in blocks of 10 after {args.warmup} warm-up calls; ms per call",
        "",
        "| shape | row | median ms | fastest block ms | × fixed-α mix (fastest block) |",
        "|---|---|---:|---:|---:|",
    ]
    raw = {"env": env, "rows": []}
    for shape in shapes:
        batch, vocab = (int(n) for n in shape.lower().split("x"))
        lp, lr = make_pair(batch, vocab, args.device)
        reference = None
        for name, fn in rows(lp, lr).items():
            median, fastest = time_row(fn, args.device, args.warmup, args.repeats)
            reference = reference or fastest
            lines.append(f"| [{batch}, {vocab}] | {name} | {median:.3f} | {fastest:.3f} | {fastest / reference:.1f}× |")
            raw["rows"].append(dict(shape=shape, row=name, median_ms=median, fastest_block_ms=fastest))
            print(lines[-1], flush=True)
    save(["\n".join(lines) + "\n"], f"q_star_step_{args.device}", raw)


if __name__ == "__main__":
    main()
