"""Is the GPU fast path's recorded log q right? Compare it with a full-sequence recompute
at a given dtype (the H100 table showed a large gap in bfloat16; float32 tells whether
that is rounding in deep random models or a bug).

    python benchmarks/check_fast_recompute.py --dtype float32 --tokens 16
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fast_path  # noqa: E402
import generate_speed as gs  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--dtype", default="float32")
parser.add_argument("--tokens", type=int, default=16)
parser.add_argument("--batch", type=int, default=8)
args = parser.parse_args()
gs.PRESETS["check"] = dict(gs.PRESETS["h100"], dtype=args.dtype, batch=args.batch, new_tokens=args.tokens)
bench = gs.Bench("check", "cuda" if torch.cuda.is_available() else "cpu", repeats=1, budget_s=300)
bench.decoders = {}
for line in fast_path.gpu_checks(bench, check_tokens=args.tokens):
    print(args.dtype, line)

# Baseline: the same drift for transformers' own cached generate of the base model alone.
with torch.no_grad():
    out = bench.base.generate(
        bench.ids,
        attention_mask=bench.mask,
        do_sample=False,
        max_new_tokens=args.tokens,
        min_new_tokens=args.tokens,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=gs.PAD,
    )
    gen = out.sequences[:, bench.ids.shape[1] :]
    full = bench.base(out.sequences, logits_to_keep=args.tokens + 1).logits.float()
    diffs = []
    for t in range(args.tokens):
        cached = torch.log_softmax(out.logits[t].float(), -1).gather(1, gen[:, t : t + 1])
        recomputed = torch.log_softmax(full[:, t], -1).gather(1, gen[:, t : t + 1])
        diffs.append((cached - recomputed).abs()[:, 0])
    d = torch.stack(diffs)
    print(
        args.dtype,
        f"- HF generate (base alone), cached vs full-sequence log p of the chosen token: "
        f"median |Δ| {d.median().item():.2e}, max {d.max().item():.2e}",
    )
