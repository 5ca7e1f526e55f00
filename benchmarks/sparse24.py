"""2:4 on the GPU: dense vs llmprune's cuSPARSELt path vs torch's stock to_sparse_semi_structured swap.

Llama-2-7B shapes (or a config .json, or a folder saved with ``--pattern 2:4``; a compressed folder of a
``--permute`` run brings its input orders, see ``saved_orders``), random weights with 2:4 magnitude masks; per-Linear time over token counts, prefill (batch x 2048) and decode of the whole model,
side by side in one run:

    python benchmarks/sparse24.py --dtype bfloat16 --out benchmarks/results/sparse24_h200_bf16_graphs.json

Timings are seconds per call of back-to-back calls (host cost included, "eager") and, on CUDA, replay of a
captured CUDA graph ("graph": GPU time alone). Decode is timed twice: eager with transformers' dynamic
cache, and as one CUDA-graph replay per step over a static cache (dense and llmprune both captured). The
sparse kernels need CUDA; on CPU only the dense rows run (to check the script), the sparse cells say why
they are missing.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from llmprune import devices
from llmprune.compressed import load, permutations
from llmprune.errors import UsageError
from llmprune.inference import graphs, kernel, planning, swap
from llmprune.models import find_decoder
from llmprune.patterns import NM, select
from llmprune.report import versions

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)


def timeit(fn, reps: int = 10, warmup: int = 2) -> float:
    """Median over 3 rounds of the seconds per call of ``reps`` back-to-back calls."""
    return planning.timeit(fn, reps, warmup)


graph_time = planning.graph_time


def _attempt(fn):
    try:
        return fn(), None
    except Exception as exc:  # a missing kernel or failed capture is a result to report, not a crash
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def mask_24(weight: torch.Tensor) -> torch.Tensor:
    """Magnitude 2:4 mask applied in place; returns the weight."""
    weight.mul_(select(weight.abs().float(), NM(2, 4)).to(weight.dtype))
    return weight


def stock_swap(model: nn.Module) -> dict:
    """torch's own route: each 2:4 Linear weight becomes a SparseSemiStructuredTensor."""
    from torch.sparse import to_sparse_semi_structured

    saved = {}
    for block in find_decoder(model)[1]:
        for m in block.modules():
            if type(m) is nn.Linear and kernel.is_2to4(m.weight):
                saved[m] = m.weight
                m.weight = nn.Parameter(to_sparse_semi_structured(m.weight.detach()), requires_grad=False)
    return saved


def stock_restore(saved: dict) -> None:
    for m, w in saved.items():
        m.weight = w


# ---------------------------------------------------------------- per Linear


def linear_shapes(cfg) -> dict[str, tuple[int, int]]:
    h, i = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    return {"q_proj/o_proj": (h, h), "k_proj/v_proj": (kv, h), "gate_proj/up_proj": (i, h), "down_proj": (h, i),
            "q+k+v fused": (h + 2 * kv, h), "gate+up fused": (2 * i, h)}


@torch.no_grad()
def bench_linears(shapes: dict, tokens, dtype, device, reps: int = 10) -> list[dict]:
    rows = []
    cuda = device.type == "cuda"
    done = set()
    for name, (out_f, in_f) in shapes.items():
        if (out_f, in_f) in done:
            continue
        done.add((out_f, in_f))
        w = mask_24(torch.randn(out_f, in_f, dtype=dtype, device=device))
        core, err = _attempt(lambda: kernel.SparseCore(w, None, kernel.Plan()))
        stock, stock_err = (None, "needs CUDA") if not cuda else _attempt(
            lambda: torch.sparse.to_sparse_semi_structured(w))
        for t in tokens:
            x = torch.randn(t, in_f, dtype=dtype, device=device)
            row = {"linear": name, "out": out_f, "in": in_f, "tokens": t}
            fns = {"dense": lambda: F.linear(x, w)}
            if core is not None and cuda:
                algos = planning.search_algos(core, x)
                row["alg"] = algos[0].alg
                fns["llmprune"] = lambda: core.sparse_mm(x, algos[0])
                y, e = _attempt(lambda: core.sparse_mm(x, algos[0]))
                if y is not None:
                    ref = F.linear(x, w)
                    row["llmprune_max_rel_err"] = float((y.float() - ref.float()).abs().max() / ref.float().abs().max())
                    row["llmprune_contiguous"] = bool(y.is_contiguous())
                elif e:
                    row["llmprune_error"] = e
            else:
                row["llmprune_error"] = err or "needs CUDA"
            if stock is not None:
                fns["stock"] = lambda: F.linear(x, stock)
            else:
                row["stock_error"] = stock_err
            for label, fn in fns.items():
                row[f"{label}_eager_ms"], e = _attempt(lambda: 1e3 * timeit(fn, reps))
                if e:
                    row[f"{label}_error"] = e
                if cuda:
                    row[f"{label}_graph_ms"], e = _attempt(lambda: 1e3 * graph_time(fn, reps))
                    if e:
                        row[f"{label}_graph_error"] = e
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


# ---------------------------------------------------------------- whole model


def build_model(spec: str, dtype, device, layers: int | None = None, seed: int = 0):
    """A model to benchmark: ``llama-2-7b`` (shapes, random weights), a config .json, or a saved folder.

    Random weights get 2:4 magnitude masks; a saved folder must already be 2:4 pruned.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    path = Path(spec).expanduser()
    if spec == "llama-2-7b" or path.suffix == ".json":
        cfg = LlamaConfig(**LLAMA2_7B) if spec == "llama-2-7b" else AutoConfig.from_pretrained(path)
        if layers:
            cfg.num_hidden_layers = layers
        torch.manual_seed(seed)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        with torch.no_grad():
            for block in find_decoder(model)[1]:
                for m in block.modules():
                    if type(m) is nn.Linear:
                        mask_24(m.weight)
        return model.eval()
    if path.is_dir():
        model = load(path, dtype=dtype)
        if layers:
            find_decoder(model)[1][:] = find_decoder(model)[1][:layers]
            model.config.num_hidden_layers = layers
        return model.to(device).eval()
    raise UsageError(f"--model {spec}: give llama-2-7b, a config .json file, or a saved model folder")


def saved_orders(spec: str, model) -> dict:
    """The input orders of a saved ``--permute`` model (compressed folder) for the Linears ``model`` still has
    (``--layers`` may drop blocks); none for anything else."""
    path = Path(spec).expanduser()
    if not path.is_dir():
        return {}
    present = {name for name, _ in model.named_modules()}
    return {name: perm for name, perm in permutations(path).items() if name in present}


@torch.no_grad()
def prefill_fn(model, batch: int, seqlen: int, vocab: int, device):
    ids = torch.randint(0, vocab, (batch, seqlen), device=device, generator=torch.Generator(device).manual_seed(1))
    return lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1).logits


@torch.no_grad()
def decode_time(model, batch: int, prompt: int, steps: int, vocab: int, device) -> float:
    """Seconds per decode step (batch tokens each) after a ``prompt``-token prefill, HF dynamic cache, eager."""
    ids = torch.randint(0, vocab, (batch, prompt), device=device, generator=torch.Generator(device).manual_seed(2))
    kw = graphs.cache_kwarg(model)

    def run(n):
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache, tok = getattr(out, kw), out.logits[:, -1:].argmax(-1)
        devices.synchronize_cuda()
        t0 = time.perf_counter()
        for _ in range(n):
            out = model(input_ids=tok, use_cache=True, **{kw: cache})
            tok = out.logits[:, -1:].argmax(-1)
        devices.synchronize_cuda()
        return (time.perf_counter() - t0) / n

    run(2)
    return sorted(run(steps) for _ in range(3))[1]


@torch.no_grad()
def graph_decode_time(model, batch: int, prompt: int, steps: int, vocab: int, device,
                      plan: kernel.Plan | None = None) -> float:
    """Seconds per decode step, static cache, each step one CUDA-graph replay (median of 3 rounds of ``steps``)."""
    ids = torch.randint(0, vocab, (batch, prompt), device=device, generator=torch.Generator(device).manual_seed(2))
    dec = graphs.StaticDecoder(model, ids, max_len=prompt + 8 + 4 * steps, plan=plan)
    try:
        for _ in range(2):
            dec.step()
        rounds = []
        for _ in range(3):
            devices.synchronize_cuda()
            t0 = time.perf_counter()
            for _ in range(steps):
                dec.step()
            devices.synchronize_cuda()
            rounds.append((time.perf_counter() - t0) / steps)
        return sorted(rounds)[1]
    finally:
        dec.close()
        if device.type == "cuda":
            torch.cuda.empty_cache()


@torch.no_grad()
def bench_model(model, prefills, decodes, device, reps: int = 3, prompt: int = 128, steps: int = 16,
                plan: kernel.Plan | None = None) -> list[dict]:
    vocab = model.config.get_text_config().vocab_size
    rows = []
    for b, s in prefills:
        fn = prefill_fn(model, b, s, vocab, device)
        row = {"kind": "prefill", "batch": b, "seqlen": s}
        row["eager_ms"], row["eager_error"] = _attempt(lambda: 1e3 * timeit(fn, reps, warmup=1))
        if device.type == "cuda":
            with plan.capturing() if plan is not None else nullcontext():  # the choices timed as GPU time
                row["graph_ms"], row["graph_error"] = _attempt(lambda: 1e3 * graph_time(fn, reps))
        rows.append({k: v for k, v in row.items() if v is not None})
        print(json.dumps(rows[-1]), flush=True)
    for b in decodes:
        row = {"kind": "decode", "batch": b, "prompt": prompt, "steps": steps}
        row["eager_ms"], row["eager_error"] = _attempt(lambda: 1e3 * decode_time(model, b, prompt, steps, vocab, device))
        if device.type == "cuda":
            row["graph_ms"], row["graph_error"] = _attempt(
                lambda: 1e3 * graph_decode_time(model, b, prompt, steps, vocab, device, plan))
        rows.append({k: v for k, v in row.items() if v is not None})
        print(json.dumps(rows[-1]), flush=True)
    return rows


@torch.no_grad()
def logits_check(model, ref: torch.Tensor, ids: torch.Tensor) -> dict:
    out = model(input_ids=ids, use_cache=False).logits.float()
    diff = (out - ref).abs()
    return {"max_abs_diff": float(diff.max()), "ref_max_abs": float(ref.abs().max()),
            "argmax_agreement": float((out.argmax(-1) == ref.argmax(-1)).float().mean())}


@torch.no_grad()
def decode_check(model, ids: torch.Tensor, plan, dense_tokens: torch.Tensor | None, steps: int = 16) -> dict:
    """Greedy tokens of the CUDA-graph decode against the same static-cache step run eagerly, and against the
    dense model's graph decode (``dense_tokens``)."""
    max_len = ids.shape[1] + steps + 8
    graph = graphs.StaticDecoder(model, ids, max_len, plan=plan, graph=True).generate(steps)
    eager = graphs.StaticDecoder(model, ids, max_len, plan=plan, graph=False).generate(steps + 2)
    out = {"steps": graph.shape[1], "graph_equals_eager_static": bool(torch.equal(graph, eager)),
           "tokens_tensor": graph}
    if dense_tokens is not None:
        out["agreement_with_dense"] = float((graph == dense_tokens).float().mean())
    return out


@torch.no_grad()
def run(model_spec: str = "llama-2-7b", dtype=torch.bfloat16, device=None, layers: int | None = None,
        tokens=(1, 16, 256, 2048, 8192, 16384), prefills=((1, 2048), (8, 2048)), decodes=(1, 32, 256), reps: int = 10,
        model_reps: int = 3, variants=("dense", "llmprune", "stock"), linears: bool = True, save=None) -> dict:
    """The whole comparison; returns a JSON-ready dict (also handed to ``save`` after each part)."""
    device = device or devices.resolve_device("auto")
    result = {"model": model_spec, "dtype": str(dtype).replace("torch.", ""), "device": str(device),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "cuda": torch.version.cuda, "versions": versions(), "tokens": list(tokens),
              "timing": "eager: back-to-back calls incl. host cost; graph: CUDA graph replay (GPU time)"}
    t0 = time.perf_counter()
    model = build_model(model_spec, dtype, device, layers)
    cfg = model.config.get_text_config()
    result["layers"] = cfg.num_hidden_layers
    result["build_s"] = time.perf_counter() - t0
    perms = saved_orders(model_spec, model)
    result["permuted_linears"] = len(perms)
    if linears:
        result["linears"] = bench_linears(linear_shapes(cfg), tokens, dtype, device, reps)
        if save:
            save(result)
    ids = torch.randint(0, cfg.vocab_size, (2, 64), device=device, generator=torch.Generator(device).manual_seed(3))
    ref = model(input_ids=ids, use_cache=False).logits.float()
    result["model_runs"] = {}
    dense_tokens = None
    for variant in variants:
        print(f"== {variant}", flush=True)
        t0 = time.perf_counter()
        entry, plan, undo = set_up(variant, model, device, ref, ids, reps, perms)
        if "error" in entry:
            result["model_runs"][variant] = entry
            continue
        entry["setup_s"] = time.perf_counter() - t0
        dense_tokens = check_variant(entry, variant, model, ref, ids, plan, dense_tokens, device)
        entry["rows"] = bench_model(model, prefills, decodes, device, model_reps, plan=plan)
        result["model_runs"][variant] = entry
        if save:
            save(result)
        if undo:
            undo()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return result


def set_up(variant: str, model, device, ref: torch.Tensor, ids: torch.Tensor, reps: int, perms: dict | None = None):
    """Put ``variant``'s Linears in place: (entry, plan, undo); the entry is ``{"error": ...}`` where that fails.

    llmprune: its sparse cores and plan (``perms``: the input orders of a --permute model, folded where they can
    be), with the logits checked once with the sparse kernel in every Linear;
    stock: torch's semi-structured weights (CUDA only); any other name: the model as it is (dense).
    """
    if variant == "llmprune":
        swapped, err = _attempt(lambda: swap.sparsify(model, reps=max(3, reps // 2), perms=perms))
        if err:
            return {"error": err}, None, None
        originals, plan = swapped
        entry = {"plan": plan.timings}
        plan.force = True  # the sparse kernel in every Linear, whatever the plan says
        entry["check_all_sparse"], err = _attempt(lambda: logits_check(model, ref, ids))
        plan.force = None
        if err:
            entry["check_all_sparse_error"] = err
        return entry, plan, lambda: swap.restore(originals)
    if variant == "stock":
        saved, err = (None, "needs CUDA") if device.type != "cuda" else _attempt(lambda: stock_swap(model))
        if err:
            return {"error": err}, None, None
        return {}, None, lambda: stock_restore(saved)
    return {}, None, None


def check_variant(entry: dict, variant: str, model, ref, ids, plan, dense_tokens, device):
    """Logits against the dense model's and, on CUDA, the graph decode's tokens; returns the dense run's tokens."""
    entry["check"], err = _attempt(lambda: logits_check(model, ref, ids))
    if err:
        entry["check_error"] = err
    if device.type == "cuda":
        entry["decode_check"], err = _attempt(lambda: decode_check(model, ids[:, :32], plan, dense_tokens))
        if err:
            entry["decode_check_error"] = err
        elif variant == "dense":
            dense_tokens = entry["decode_check"].pop("tokens_tensor")
        else:
            entry["decode_check"].pop("tokens_tensor")
    return dense_tokens


# ---------------------------------------------------------------- command line


def _positive_ints(text: str) -> list[int]:
    """'1,16,256' -> [1, 16, 256] ('' -> [])."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give integers such as 1,16,256") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers such as 1,16,256")
    return values


def _shapes(text: str) -> list[tuple[int, int]]:
    """'1x2048,8x2048' -> [(1, 2048), (8, 2048)] ('' -> [])."""
    try:
        shapes = [tuple(int(v) for v in s.split("x")) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give batch x tokens shapes such as 1x2048,8x2048") from None
    if any(len(s) != 2 or min(s) < 1 for s in shapes):
        raise argparse.ArgumentTypeError(f"{text!r}: give positive batch x tokens shapes such as 1x2048,8x2048")
    return shapes


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-2-7b",
                   help="llama-2-7b (its shapes, random weights with 2:4 masks), a config .json, or a folder saved "
                        "with --pattern 2:4")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: the model's)")
    p.add_argument("--tokens", type=_positive_ints, default="1,16,256,2048,8192,16384",
                   help="token counts of the per-Linear timings")
    p.add_argument("--prefills", type=_shapes, default="1x2048,8x2048", help="prefill shapes, batch x tokens")
    p.add_argument("--decodes", type=_positive_ints, default="1,32,256", help="decode batch sizes ('' for none)")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--no-linears", action="store_true")
    p.add_argument("--variants", default="dense,llmprune,stock")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    if not a.tokens:
        p.error("--tokens: give at least one token count")
    if a.out.is_dir():
        p.error(f"--out {a.out} is a folder; give a file path such as sparse24.json")
    return a


def main(argv=None) -> None:
    a = parse_args(argv)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join(sys.argv if argv is None else ["benchmarks/sparse24.py", *argv])

    def save(result):
        a.out.write_text(json.dumps({**result, "command": command}, indent=1))

    result = run(a.model, getattr(torch, a.dtype), devices.resolve_device(a.device), layers=a.layers,
                 tokens=a.tokens, prefills=a.prefills, decodes=a.decodes, reps=a.reps, linears=not a.no_linears,
                 variants=a.variants.split(","), save=save)
    save(result)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
