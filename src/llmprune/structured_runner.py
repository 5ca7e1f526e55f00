"""Structured pruning, block by block: score, remove, restore, propagate through the pruned block.

Blocks first (ShortGPT: one dense pass gives each block 1 - mean cos(input, output) over the calibration
tokens; the least important go), then widths: the inputs of the first kept block are captured, and for each
block the inputs of its consuming Linears (o_proj, down_proj) are summarised in the statistics the
importance and the restoration declared, the lowest-scoring KV groups and MLP channels are removed
(``surgery``), the consuming weight restored, and the pruned block re-run to give the next block's inputs.
Only one block and the calibration hidden states sit on the device. ``--restore lsq-dense`` also carries the
unshrunk model's hidden states alongside (a second copy): each block, still whole, runs on both, and the re-fit
targets what the consuming Linear gave in the unshrunk model rather than on the pruned model's own inputs.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch
from tqdm.auto import tqdm

from . import surgery
from .activations import ActivationStore
from .capture import StatisticsCollector, collect_statistics
from .stats import STATISTICS
from .errors import UsageError
from .guards import check_finite
from .methods.channels import IMPORTANCE, compensation_bias, cosine_sum, keep_top
from .methods.update import lsq_columns
from .models import find_decoder
from .runner import _block_output, _calls_of, _run_block, capture_block_inputs
from .structured import Structured, StructuredResult, Widths, adaptive_widths, plan_widths


@torch.no_grad()
def prune_structured_blocks(model, tokens: torch.Tensor | None, opts: Structured, device: torch.device,
                            batch_size: int = 8, progress: bool = True) -> StructuredResult:
    """Shrink ``model`` in place to the widths of ``opts``; its config describes the new widths."""
    surgery.check_supported(model)
    shape = surgery.shape_of(model)
    widths = plan_widths(shape, opts)
    _check_biases(model, opts, widths, shape)
    _check_objective(model, opts)
    before = {"decoder_before": surgery.decoder_params(model), "model_before": surgery.model_params(model)}
    start = time.perf_counter()
    kept, importance = list(range(shape.layers)), None
    if widths.num_hidden_layers < shape.layers:
        importance = block_importance(model, tokens, device, batch_size, progress)
        kept = keep_top(torch.tensor(importance), widths.num_hidden_layers).tolist()
        surgery.drop_blocks(model, kept)
    shrinks = widths.intermediate_size < shape.intermediate or widths.num_key_value_heads < shape.kv_heads
    sizes = [widths.intermediate_size] * len(kept)
    if shrinks and opts.allocation == "adaptive" and widths.intermediate_size < shape.intermediate:
        sizes = adaptive_sizes(model, tokens, opts, widths, device, batch_size, progress)
    records = _shrink_widths(model, tokens, opts, widths, sizes, shape, device, batch_size, progress) \
        if shrinks else []
    biased = tuple(part for part, shrunk in (("heads", widths.num_key_value_heads < shape.kv_heads),
                                             ("mlp", widths.intermediate_size < shape.intermediate))
                   if shrunk and opts.restore == "bias")
    surgery.write_config(model, sizes, widths.num_key_value_heads, shape, biased)
    blocks = [{"block": i, "source_block": src, "intermediate_size": sizes[i],
               "num_key_value_heads": widths.num_key_value_heads, **(records[i] if records else {})}
              for i, src in enumerate(kept)]
    params = {**before, "decoder_after": surgery.decoder_params(model), "model_after": surgery.model_params(model)}
    return StructuredResult(opts, widths, shape, kept, importance, blocks, params, time.perf_counter() - start)


def _check_biases(model, opts: Structured, widths: Widths, shape) -> None:
    """``--restore bias`` needs a config flag for each bias it adds; refused with one line where there is none."""
    if opts.restore != "bias":
        return
    for part, shrunk in (("heads", widths.num_key_value_heads < shape.kv_heads),
                         ("mlp", widths.intermediate_size < shape.intermediate)):
        if shrunk and surgery.bias_flag(model, part) is None:
            where = "o_proj" if part == "heads" else "down_proj"
            raise UsageError(f"--restore bias adds a bias to {where}, but {type(model).__name__}'s config has no flag "
                             f"for one, so the saved model would not load as a standard one; use --restore lsq or none")


def _check_objective(model, opts: Structured) -> None:
    """``--objective post-norm`` needs blocks that normalise the consuming Linears' outputs; refused where none do."""
    if opts.objective != "post-norm":
        return
    block = find_decoder(model)[1][0]
    if not post_norms(block):
        raise UsageError(f"--objective post-norm: {type(block).__name__} adds o_proj's and down_proj's outputs to the "
                         "residual stream unnormalised (only Gemma 2 / 3 and OLMo 2 style blocks normalise them); "
                         "drop --objective")


def post_norms(block) -> dict:
    """The norm each consuming Linear's output goes through before the residual add: {"o_proj": norm, "down_proj":
    norm} for blocks with a post-feedforward norm (there, post_attention_layernorm normalises the attention's
    output; in Llama-style blocks it is the MLP's input norm); {} otherwise."""
    after_mlp = getattr(block, "post_feedforward_layernorm", None)
    after_attn = getattr(block, "post_attention_layernorm", None)
    if after_mlp is None or after_attn is None:
        return {}
    return {"o_proj": after_attn, "down_proj": after_mlp}


def block_importance(model, tokens: torch.Tensor, device: torch.device, batch_size: int,
                     progress: bool = True) -> list[float]:
    """Dense pass: per block, 1 - the mean over calibration tokens of cos(block input, block output)."""
    blocks = find_decoder(model)[1]
    hidden, calls = capture_block_inputs(model, tokens, batch_size, device, ActivationStore(device))
    scores = []
    for index, block in enumerate(tqdm(blocks, desc="block importance", unit="block", disable=not progress)):
        home = next(block.parameters()).device
        block.to(device)
        total, count = 0.0, 0
        for i, h in enumerate(hidden):
            call = calls[h.shape[0]][index]
            out = _block_output(block(h, *call.args, **call.kwargs))
            s, n = cosine_sum(h, out)
            total, count = total + s, count + n
            hidden[i] = out
        scores.append(1.0 - total / max(count, 1))
        block.to(home)
    return scores


def adaptive_sizes(model, tokens, opts: Structured, widths: Widths, device, batch_size: int,
                   progress: bool) -> list[int]:
    """``--allocation adaptive``: per block, its MLP width. One pass of the unpruned blocks scores every block's
    channels (the importance's score, on the unpruned model's inputs, as FLAP's search does); as many channels in
    all as the uniform widths keep stay, chosen by ``adaptive_widths``."""
    importance = IMPORTANCE[opts.importance]
    blocks = find_decoder(model)[1]
    scores = []
    if importance.needs:
        hidden, calls = capture_block_inputs(model, tokens, batch_size, device, ActivationStore(device))
    for index, block in enumerate(tqdm(blocks, desc="adaptive widths", unit="block", disable=not progress)):
        home = next(block.parameters()).device
        block.to(device)
        stats = {}
        if importance.needs:
            stats = _consumer_stats(block, hidden, _calls_of(calls, index), importance.needs, opts.objective)
            if index < len(blocks) - 1:
                _run_block(block, hidden, _calls_of(calls, index))
        stats = stats.get("down_proj", {})
        down = surgery.parts(block)[1].down_proj.weight.data
        scores.append(importance.score(_gained(down, stats), stats).float().cpu())
        block.to(home)
    return adaptive_widths(scores, widths.intermediate_size * len(blocks), opts.multiple)


def _shrink_widths(model, tokens, opts: Structured, widths: Widths, sizes: list[int], shape, device,
                   batch_size: int, progress: bool) -> list[dict]:
    """Every kept block shrunk to ``widths`` (block i's MLP to ``sizes[i]``), in order, each one's pruned outputs
    feeding the next."""
    blocks = find_decoder(model)[1]
    needs = opts.needs
    hidden, calls = ([], {})
    if needs:
        hidden, calls = capture_block_inputs(model, tokens, batch_size, device, ActivationStore(device))
        check_finite(hidden, "the inputs of block 0", hidden[0].dtype)
    dense = None
    if opts.restore == "lsq-dense":
        dense = ActivationStore(device)
        for h in hidden:
            dense.append(h.clone())
    records = []
    for index, block in enumerate(tqdm(blocks, desc=f"structured {opts.importance}", unit="block",
                                       disable=not progress)):
        home = next(block.parameters()).device
        block.to(device)
        if dense is not None:
            stats = _paired_stats(block, hidden, dense, _calls_of(calls, index), needs)
        else:
            stats = _consumer_stats(block, hidden, _calls_of(calls, index), needs, opts.objective) if needs else {}
        records.append(shrink_block(block, stats, opts, replace(widths, intermediate_size=sizes[index]), shape))
        if needs and index < len(blocks) - 1:
            _run_block(block, hidden, _calls_of(calls, index))
            check_finite(hidden, f"the output of block {index}", next(block.parameters()).dtype)
        block.to(home)
    return records


def _consumer_stats(block, hidden, block_calls, needs, objective: str = "output") -> dict:
    """The declared statistics of the inputs of o_proj and down_proj over every calibration batch; with the
    post-norm objective, over tokens weighted by 1 / (mean y_t^2 + eps), y the Linear's output, and with the norm's
    gain as ``row_gain``."""
    attn, mlp = surgery.parts(block)
    layers = {"o_proj": attn.o_proj, "down_proj": mlp.down_proj}
    if objective == "post-norm":
        return _post_norm_stats(block, hidden, block_calls, needs, layers)
    with collect_statistics(layers, needs) as collector:
        _run_block(block, hidden, block_calls, collector=collector)
    return {name: collector.for_layer(name) for name in layers}


def _post_norm_stats(block, hidden, block_calls, needs, layers) -> dict:
    """Per consuming Linear, its declared statistics over tokens weighted by 1 / (mean y_t^2 + eps), y its output
    and eps its post-norm's (to first order, the error after an RMS norm is the error of y over y's RMS), and the
    norm's per-feature gain g (the norm of a vector of ones, whose RMS is 1) as ``row_gain``."""
    norms = post_norms(block)
    device = next(block.parameters()).device
    stats = {name: {k: STATISTICS[k](layer.in_features, device) for k in needs} for name, layer in layers.items()}

    def hook(name):
        eps = _norm_eps(norms[name])

        def forward_hook(module, args, output):
            weight = torch.reciprocal(output.detach().float().pow(2).mean(dim=-1, keepdim=True) + eps)
            for acc in stats[name].values():
                acc.add_weighted(args[0].detach(), weight)
        return forward_hook

    handles = [layer.register_forward_hook(hook(name)) for name, layer in layers.items()]
    try:
        for h in hidden:
            call = block_calls[h.shape[0]]
            block(h, *call.args, **call.kwargs)
    finally:
        for handle in handles:
            handle.remove()
    for name, layer in layers.items():
        ones = torch.ones(1, layer.out_features, dtype=layer.weight.dtype, device=device)
        stats[name]["row_gain"] = (norms[name](ones).float() * (1 + _norm_eps(norms[name])) ** 0.5).flatten()
    return stats


def _norm_eps(norm) -> float:
    """An RMS norm's epsilon, under either of the names transformers' norms give it."""
    return float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6)))


def _paired_stats(block, hidden, dense, block_calls, needs) -> dict:
    """``_consumer_stats`` of the pruned stream (X), plus per consuming Linear the cross moment C = 2/n X^T Y with
    its inputs in the unshrunk stream (Y), token by token, the block still whole; the unshrunk stream is advanced
    through it. One pass of each stream: the collector's hooks read the pruned pass only."""
    attn, mlp = surgery.parts(block)
    layers = {"o_proj": attn.o_proj, "down_proj": mlp.down_proj}
    collector = StatisticsCollector(layers, needs, stop_early=False)
    collect = {name: collector.hook(name) for name in layers}
    seen: dict[str, torch.Tensor] = {}
    pruned_pass = [True]

    def hook(name):
        def pre_hook(module, args):
            seen[name] = args[0]
            if pruned_pass[0]:
                collect[name](module, args)
        return pre_hook

    hooks = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    sums: dict[str, torch.Tensor] = {}
    tokens = 0
    try:
        for i, h in enumerate(hidden):
            call = block_calls[h.shape[0]]
            pruned_pass[0] = True
            block(h, *call.args, **call.kwargs)
            collector.end_call()
            pruned_inputs, pruned_pass[0] = dict(seen), False
            dense[i] = _block_output(block(dense[i], *call.args, **call.kwargs))
            for name, x in pruned_inputs.items():
                x, y = x.reshape(-1, x.shape[-1]).float(), seen[name].reshape(-1, x.shape[-1]).float()
                sums[name] = sums.get(name, 0) + (x.T @ y).double()
            tokens += h.shape[0] * h.shape[1]
    finally:
        for handle in hooks:
            handle.remove()
    return {name: {**collector.for_layer(name), "cross": (sums[name] * (2.0 / max(tokens, 1))).float()}
            for name in layers}


def shrink_block(block, stats: dict, opts: Structured, widths: Widths, shape) -> dict:
    """Remove the lowest-scoring KV groups and MLP channels of one block and restore the consuming weights;
    what was kept."""
    importance = IMPORTANCE[opts.importance]
    attn, mlp = surgery.parts(block)
    record = {}
    if widths.num_key_value_heads < shape.kv_heads:
        o_stats = stats.get("o_proj", {})
        kept_groups = importance.keep(_gained(attn.o_proj.weight.data, o_stats), o_stats, shape.kv_heads,
                                      widths.num_key_value_heads, opts.damp)
        cols = surgery.group_channels(kept_groups, shape.heads_per_group * shape.head_dim)
        surgery.keep_kv_groups(block, kept_groups, shape, *restored(attn.o_proj, cols, o_stats, opts))
        record["kv_groups_kept"] = kept_groups.tolist()
    if widths.intermediate_size < shape.intermediate:
        d_stats = stats.get("down_proj", {})
        kept = importance.keep(_gained(mlp.down_proj.weight.data, d_stats), d_stats, shape.intermediate,
                               widths.intermediate_size, opts.damp)
        surgery.keep_mlp_channels(block, kept, *restored(mlp.down_proj, kept, d_stats, opts))
    return record


def _gained(weight: torch.Tensor, stats: dict) -> torch.Tensor:
    """The consuming weight as the selection sees it: rows scaled by the post-norm's gain where there is one (the
    re-fit is row by row, so it takes the weight as it is)."""
    gain = stats.get("row_gain")
    return weight if gain is None else weight * gain.to(weight.device, weight.dtype).unsqueeze(1)


def restored(linear, kept: torch.Tensor, stats: dict, opts: Structured):
    """(new weight on the kept columns or None, new bias or None) of a consuming Linear, as ``opts.restore`` says."""
    w = linear.weight.data
    kept = kept.to(w.device)
    if opts.restore in ("lsq", "lsq-dense"):
        return lsq_columns(w, kept, stats["hessian"].matrix.to(w.device), opts.damp, stats.get("cross")), None
    if opts.restore == "bias":
        bias = compensation_bias(w, stats["means"].mean, kept)
        if linear.bias is not None:
            bias = bias + linear.bias.data.float()
        return None, bias
    return None, None
