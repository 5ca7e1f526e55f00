"""Structured pruning: WikiText-2 perplexity of each importance x restoration at 10/20/30% of the decoder's
parameters removed, and the speed of the saved models in plain transformers, dense against pruned.

``ppl`` (the README's small CPU protocol): 32 C4 calibration windows x 512 tokens, seed 0; WikiText-2 test, the
first 32 windows of 512; float32. Every row starts from freshly loaded weights with the same calibration tokens
and windows, and goes through ``llmprune.prune_structured``, the function the command calls. Rows are written as
they finish; a rerun with the same --out skips them.

    python benchmarks/structured.py ppl --out benchmarks/results/structured_smollm2.json

``speed``: the dense model and the pruned one are saved, each loaded back with plain
``AutoModelForCausalLM.from_pretrained``, and timed side by side in one process, interleaved: prefill (one
forward of batch x seqlen tokens, logits of the last position only) and greedy decode with the KV cache
(steps after a prompt), warm-up first, the median of the repeats. Each timing is kept as wall time and as the
process's CPU time: on a shared CPU, a one-thread run's CPU time (``--threads 1``) is the steadier measure.

    python benchmarks/structured.py speed --remove 0.2 --out benchmarks/results/structured_speed_smollm2_cpu.json
    python benchmarks/structured.py speed --shape llama-2-7b --device cuda --dtype bfloat16 --out speed_7b.json

``--shape`` builds a model of that shape from its config with random weights (no download, nothing read);
it is pruned with ``magnitude`` importance (no calibration), which gives the same widths any importance would.

``prune``: the prune time of each importance+restore in ``--only`` on the same model (a fresh copy each, with
``--shape`` random weights and random calibration tokens), through ``llmprune.prune_structured``; no saving.

    python benchmarks/structured.py prune --shape llama-2-7b --device cuda --dtype bfloat16 --nsamples 128 \
        --seqlen 2048 --only flap+lsq obs+lsq --out prune_time_7b.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from llmprune import api, data, devices, loading, report, surgery
from llmprune.config import Calibration
from llmprune.evaluate import perplexity, windows_of

SHAPES = {
    "llama-2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024),
}
IMPORTANCES = ("wanda-sp", "flap", "magnitude", "obs")
RESTORES = ("none", "lsq", "bias", "lsq-dense")
REMOVES = (0.2, 0.1, 0.3)


def ppl_runs(structure: str):
    """(label, structure, importance, restore, remove, objective, allocation) in priority order: 20% first; the
    post-norm objective's rows (labelled ``+post-norm``) and the adaptive widths' (``+adaptive``) after the others."""
    for remove in REMOVES:
        for importance in IMPORTANCES:
            for restore in RESTORES:
                yield f"{importance}+{restore}", structure, importance, restore, remove, "output", "uniform"
        yield "shortgpt", "blocks", "magnitude", "none", remove, "output", "uniform"
        for importance, restore in (("flap", "lsq"), ("wanda-sp", "lsq"), ("obs", "lsq"), ("obs", "none")):
            yield f"{importance}+{restore}+post-norm", structure, importance, restore, remove, "post-norm", "uniform"
        for importance, restore in (("flap", "lsq"), ("flap", "none"), ("wanda-sp", "lsq"), ("wanda-sp", "none")):
            for objective in ("output", "post-norm"):
                suffix = "+post-norm" if objective == "post-norm" else ""
                yield f"{importance}+{restore}{suffix}+adaptive", structure, importance, restore, remove, objective, \
                    "adaptive"


def ppl_row(args, tok, tokens, calib, wins, device, dtype, run) -> dict:
    label, structure, importance, restore, remove, objective, allocation = run
    model, _, _ = loading.load_model(args.model, dtype)
    try:
        res = api.prune_structured(model, tok, structure=structure, remove=remove, importance=importance,
                                   restore=restore, objective=objective, allocation=allocation,
                                   width_multiple=args.width_multiple,
                                   calib_tokens=tokens,
                                   calibration=calib, device=device, progress=False)
    except Exception as exc:  # e.g. --restore bias on a config without the flag: recorded, not fatal
        return {"label": label, "structure": structure, "remove": remove, "error": str(exc)}
    t0 = time.perf_counter()
    ppl = perplexity(model.to(device), wins, device, max(1, 4096 // args.eval_seqlen), progress=False).perplexity
    return {"label": label, "structure": structure, "importance": importance, "restore": restore, "remove": remove,
            "perplexity": ppl, "removed_fraction": res.removed_fraction,
            "model_removed_fraction": res.model_removed_fraction, "widths": res.widths.to_dict(),
            **({"intermediate_sizes": [b["intermediate_size"] for b in res.blocks]} if allocation != "uniform" else {}),
            "params": res.params, "prune_s": res.prune_s, "eval_s": time.perf_counter() - t0,
            "threads": torch.get_num_threads(), "settings": res.options.settings()}


def run_ppl(args) -> None:
    device = devices.resolve_device(args.device)
    dtype = devices.resolve_dtype(args.dtype, device)
    ddir = data.data_dir(None)
    model, tok, info = loading.load_model(args.model, dtype)
    calib = Calibration("c4", args.nsamples, args.seqlen, 0)
    protocol = {"calibration": calib.to_dict(), "eval": {"set": "wikitext2", "seqlen": args.eval_seqlen,
                                                         "windows": args.eval_windows},
                "structure": args.structure, "width_multiple": args.width_multiple}
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.is_file() else None
    if result is not None and result.get("protocol") != protocol:
        raise SystemExit(f"{out} holds another protocol; choose another --out")
    tokens = api.calibration_tokens(model, tok, calib, ddir)
    bos = tok.bos_token_id if api.needs_bos(model) else None
    wins = windows_of(data.eval_tokens(tok, "wikitext2", args.eval_seqlen, ddir), args.eval_seqlen,
                      args.eval_windows, bos)
    if result is None:
        dense = perplexity(model.to(device), wins, device, max(1, 4096 // args.eval_seqlen), progress=False).perplexity
        result = {"model": info, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
                  "machine": machine(), "protocol": protocol, "versions": report.versions(),
                  "rows": [{"label": "dense", "perplexity": dense, "removed_fraction": 0.0}]}
        report.write_json(out, result)
    done = {(r["label"], r.get("remove")) for r in result["rows"]}
    for run in ppl_runs(args.structure):
        if (run[0], run[4]) in done or (args.only and run[0] not in args.only) or \
                (args.removes and run[4] not in args.removes):
            continue
        row = ppl_row(args, tok, tokens, calib, wins, device, dtype, run)
        result["rows"].append(row)
        report.write_json(out, result)
        print(json.dumps({k: row.get(k) for k in ("label", "remove", "perplexity", "removed_fraction", "error")}),
              flush=True)


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


# ---------------------------------------------------------------- speed


def shape_model(shape: str, dtype, device):
    """A Llama of ``shape`` from its config, random weights, on ``device``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(LlamaConfig(**SHAPES[shape]), dtype=dtype)
    return model.eval(), None


def save_pair(args, device, dtype, folder: Path) -> dict:
    """Save the dense model and its pruned copy into ``folder``/dense and ``folder``/pruned; what was pruned."""
    if args.shape:
        model, tok = shape_model(args.shape, dtype, device)
    else:
        model, tok, _ = loading.load_model(args.model, dtype)
    model.save_pretrained(folder / "dense")
    calib = Calibration("c4", args.nsamples, args.seqlen, 0)
    remove = args.remove
    if args.of == "model":  # --remove counts the whole model's parameters: the decoder gives them all
        remove = args.remove * surgery.model_params(model) / surgery.decoder_params(model)
    # a --shape model has no tokenizer: random tokens stand in where the choice needs calibration (ShortGPT's
    # block importance); they pick which blocks go, not how many, so the speed is the same
    tokens = (torch.randint(0, model.config.vocab_size, (args.nsamples, args.seqlen),
                            generator=torch.Generator().manual_seed(0)) if args.shape else None)
    res = api.prune_structured(model, tok, structure=args.structure, remove=remove, importance=args.importance,
                               restore=args.restore, width_multiple=args.width_multiple, calibration=calib,
                               calib_tokens=tokens, device=device, progress=False)
    model.save_pretrained(folder / "pruned")
    del model
    return {"widths": res.widths.to_dict(), "params": res.params, "prune_s": res.prune_s,
            "removed_fraction": res.removed_fraction,
            "model_removed_fraction": res.model_removed_fraction, "settings": res.options.settings()}


def clocks() -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds): on a shared CPU the CPU time of a one-thread run is the steadier."""
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    now = clocks()
    return now[0] - start[0], now[1] - start[1]


def prefill_s(model, ids) -> tuple[float, float]:
    devices.synchronize(ids.device)
    t0 = clocks()
    model(input_ids=ids, use_cache=False, logits_to_keep=1)
    devices.synchronize(ids.device)
    return since(t0)


def decode_s(model, ids, steps: int) -> tuple[float, float]:
    """Seconds for ``steps`` greedy steps with the KV cache after the prompt ``ids`` (the prompt not timed)."""
    from llmprune.inference.graphs import cache_kwarg

    kw = cache_kwarg(model)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache, tok = getattr(out, kw), out.logits[:, -1:].argmax(-1)
    devices.synchronize(ids.device)
    t0 = clocks()
    for _ in range(steps):
        out = model(input_ids=tok, use_cache=True, **{kw: cache})
        tok = out.logits[:, -1:].argmax(-1)
    devices.synchronize(ids.device)
    return since(t0)


@torch.no_grad()
def graph_decode_s(model, ids, steps: int) -> tuple[float, float]:
    """Like ``decode_s`` over a static KV cache with each step one CUDA-graph replay (how serving stacks decode);
    the prompt, the warm-up steps and the capture are not timed."""
    from llmprune.inference.graphs import StaticDecoder

    dec = StaticDecoder(model, ids, max_len=ids.shape[1] + steps + 3, graph=True)
    devices.synchronize(ids.device)
    t0 = clocks()
    for _ in range(steps):
        dec.step()
    devices.synchronize(ids.device)
    took = since(t0)
    dec.close()
    return took


@torch.no_grad()
def time_pair(models: dict, args, device) -> dict:
    """Interleaved timings of each model (warm-up first); tokens/s from the median of the repeats."""
    vocab = next(iter(models.values())).config.vocab_size
    gen = torch.Generator().manual_seed(1)
    pre = torch.randint(0, vocab, (args.batch, args.prefill), generator=gen).to(device)
    prompt = torch.randint(0, vocab, (args.batch, args.prompt), generator=gen).to(device)
    kinds = ("prefill", "decode", "graph_decode") if device.type == "cuda" else ("prefill", "decode")
    times = {name: {kind: [] for kind in kinds} for name in models}
    for rep in range(args.warmup + args.repeats):
        for name, model in models.items():
            took = {"prefill": prefill_s(model, pre), "decode": decode_s(model, prompt, args.steps)}
            if "graph_decode" in kinds:
                took["graph_decode"] = graph_decode_s(model, prompt, args.steps)
            if rep >= args.warmup:
                for kind in kinds:
                    times[name][kind].append(took[kind])
    return {name: rates(t, args) for name, t in times.items()}


def rates(t: dict, args) -> dict:
    """Tokens per second from the median wall time, and (CPU) from the median CPU time of the process."""
    out = {}
    for kind in t:
        tokens = args.batch * (args.prefill if kind == "prefill" else args.steps)
        wall, cpu = [w for w, _ in t[kind]], [c for _, c in t[kind]]
        out.update({f"{kind}_s": wall, f"{kind}_cpu_s": cpu, f"{kind}_tok_s": tokens / statistics.median(wall),
                    f"{kind}_tok_cpu_s": tokens / statistics.median(cpu)})
    return out


def run_prune_time(args) -> None:
    device = devices.resolve_device(args.device)
    dtype = devices.resolve_dtype(args.dtype, device)
    rows = []
    for label in args.only or ["wanda-sp+none"]:
        importance, restore, *flags = (label.split("+") + ["none"])[:2] + label.split("+")[2:]
        model, tok = shape_model(args.shape, dtype, device) if args.shape else loading.load_model(args.model, dtype)[:2]
        tokens = torch.randint(0, model.config.vocab_size, (args.nsamples, args.seqlen),
                               generator=torch.Generator().manual_seed(0)) if args.shape else None
        devices.synchronize(device)
        t0 = time.perf_counter()
        res = api.prune_structured(model, tok, structure=args.structure, remove=args.remove, importance=importance,
                                   restore=restore or "none", width_multiple=args.width_multiple,
                                   objective="post-norm" if "post-norm" in flags else "output",
                                   allocation="adaptive" if "adaptive" in flags else "uniform",
                                   calibration=Calibration("c4", args.nsamples, args.seqlen, 0), calib_tokens=tokens,
                                   device=device, progress=False)
        devices.synchronize(device)
        rows.append({"label": label, "prune_s": res.prune_s, "wall_s": time.perf_counter() - t0,
                     "widths": res.widths.to_dict(), "removed_fraction": res.removed_fraction,
                     "settings": res.options.settings()})
        print(json.dumps({k: rows[-1][k] for k in ("label", "prune_s", "wall_s")}), flush=True)
        del model, res
    report.write_json(args.out, {"model": args.shape or args.model, "device": str(device),
                                 "dtype": str(dtype).replace("torch.", ""), "machine": machine(),
                                 "versions": report.versions(), "structure": args.structure, "remove": args.remove,
                                 "calibration": {"nsamples": args.nsamples, "seqlen": args.seqlen,
                                                 "tokens": "random" if args.shape else "c4"}, "rows": rows})


def run_speed(args) -> None:
    from transformers import AutoModelForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    device = devices.resolve_device(args.device)
    dtype = devices.resolve_dtype(args.dtype, device)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        pruned = save_pair(args, device, dtype, Path(tmp))
        models = {name: AutoModelForCausalLM.from_pretrained(Path(tmp) / name, dtype=dtype).to(device).eval()
                  for name in ("dense", "pruned")}
        timed = time_pair(models, args, device)
    result = {"model": args.shape or args.model, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
              "machine": machine(), "versions": report.versions(), "pruned": pruned,
              "protocol": {k: getattr(args, k) for k in ("batch", "prefill", "prompt", "steps", "warmup", "repeats",
                                                           "remove", "of")},
              "timings": timed, "speedup": {k: timed["pruned"][k] / timed["dense"][k] for k in timed["dense"]
                                            if k.endswith("_tok_s") or k.endswith("_tok_cpu_s")},
              "load_average": os.getloadavg()}
    report.write_json(args.out, result)
    print(json.dumps(result["speedup"]), flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mode", choices=("ppl", "speed", "prune"))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--shape", choices=tuple(SHAPES), default=None, help="speed: a random-weight model of this shape")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--structure", default="mlp,heads")
    ap.add_argument("--remove", type=float, default=0.2)
    ap.add_argument("--of", choices=("decoder", "model"), default="decoder",
                    help="speed: --remove is a fraction of the decoder blocks' parameters (the command's meaning) or "
                         "of the whole model's (embeddings included, which no structure shrinks)")
    ap.add_argument("--importance", default=None, help="speed: default magnitude with --shape, else wanda-sp")
    ap.add_argument("--restore", default="none")
    ap.add_argument("--width-multiple", type=int, default=32)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--only", nargs="*", default=None, help="ppl: only these labels")
    ap.add_argument("--removes", nargs="*", type=float, default=None, help="ppl: only these fractions")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prefill", type=int, default=512, help="speed: tokens per prefill window")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tmp", default=None, help="speed: where the two saved folders go (default: the system's)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.importance is None:
        args.importance = "magnitude" if args.shape else "wanda-sp"
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    {"ppl": run_ppl, "speed": run_speed, "prune": run_prune_time}[args.mode](args)


if __name__ == "__main__":
    main(sys.argv[1:])
