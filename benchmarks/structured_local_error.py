"""The local error each channel choice leaves: for some blocks of the dense model, the output error of down_proj
after the lsq re-fit on the kept channels, relative to its output energy, for the obs, flap and wanda-sp choices.

Statistics of down_proj's input over the calibration tokens (the README's small protocol: 32 C4 windows x 512,
seed 0) in the dense model; each choice keeps the width ``--remove`` gives the MLP (``plan_widths``, structure mlp);
error = tr((V - W) H (V - W)^T) / tr(W H W^T) with V the re-fitted weight (``lsq_columns``, dampening 0.01).

    python benchmarks/structured_local_error.py --out benchmarks/results/structured_local_error_gemma3.json
"""

from __future__ import annotations

import argparse
import sys

import torch

from llmprune import api, data, loading, report, surgery
from llmprune.capture import collect_statistics
from llmprune.config import Calibration
from llmprune.methods.channels import IMPORTANCE
from llmprune.methods.update import lsq_columns
from llmprune.models import find_decoder
from llmprune.stats import STATISTICS
from llmprune.structured import Structured, plan_widths

CHOICES = ("obs", "flap", "wanda-sp")


def down_proj_stats(model, tokens, blocks: list[int], batch: int) -> dict:
    """Per block index: norms, means and Hessian of down_proj's input over ``tokens`` in this (dense) model."""
    layers = {str(i): find_decoder(model)[1][i].mlp.down_proj for i in blocks}
    with collect_statistics(layers, tuple(STATISTICS), stop_early=False) as collector, torch.no_grad():
        for start in range(0, tokens.shape[0], batch):
            model(tokens[start:start + batch], use_cache=False)
            collector.end_call()
    return {i: collector.for_layer(str(i)) for i in blocks}


def relative_error(w: torch.Tensor, kept: torch.Tensor, h: torch.Tensor, damp: float) -> float:
    v = torch.zeros_like(w, dtype=torch.float64)
    v[:, kept] = lsq_columns(w, kept, h, damp).double()
    d, hd = v - w.double(), h.double()
    return float(torch.trace(d @ hd @ d.T) / torch.trace(w.double() @ hd @ w.double().T))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--blocks", type=int, nargs="*", default=[0, 8, 17])
    ap.add_argument("--remove", type=float, default=0.2)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    model, tok, info = loading.load_model(args.model, torch.float32)
    calib = Calibration("c4", args.nsamples, args.seqlen, 0)
    tokens = api.calibration_tokens(model, tok, calib, data.data_dir(None))
    shape = surgery.shape_of(model)
    keep = plan_widths(shape, Structured(("mlp",), args.remove)).intermediate_size
    stats = down_proj_stats(model, tokens, args.blocks, 8)
    rows = []
    for i in args.blocks:
        w = find_decoder(model)[1][i].mlp.down_proj.weight.detach()
        kept = {c: IMPORTANCE[c].keep(w, stats[i], shape.intermediate, keep, args.damp) for c in CHOICES}
        row = {"block": i, "kept": keep, "of": shape.intermediate,
               "relative_error": {c: relative_error(w, k, stats[i]["hessian"].matrix, args.damp) for c, k in kept.items()},
               "shared_with_obs": {c: len(set(kept["obs"].tolist()) & set(k.tolist())) for c, k in kept.items()}}
        rows.append(row)
        print(row, flush=True)
    report.write_json(args.out, {"model": info, "calibration": calib.to_dict(), "remove": args.remove,
                                 "damp": args.damp, "versions": report.versions(), "rows": rows})


if __name__ == "__main__":
    main(sys.argv[1:])
