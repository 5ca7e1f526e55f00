"""Command line: wiring only. Parses strings once, builds the typed options, calls the API."""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import UsageError

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None, help="One-shot pruning of large language models.",
                  pretty_exceptions_show_locals=False)
console = Console(stderr=True)

ModelOpt = typer.Option("smollm2-135m", "--model", help="Hub id, local folder, .gguf file, or an alias: smollm2-135m, gemma3-270m.")
DeviceOpt = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N")
DtypeOpt = typer.Option("auto", "--dtype", help="auto | float32 | bfloat16 | float16 (statistics are always fp32).")
EvalOpt = typer.Option("wikitext2", "--eval", help="Comma list of perplexity sets: wikitext2, ptb, c4 ('' for none).")
EvalSeqOpt = typer.Option(None, "--eval-seqlen", help="Evaluation window length (default: --seqlen).")
MaxWinOpt = typer.Option(None, "--max-eval-windows", help="Evaluate only the first K windows (default: all).")
DataDirOpt = typer.Option(None, "--data-dir", help="Folder with local data (default: $LLMPRUNE_DATA_DIR, else the hub).")
TrustOpt = typer.Option(False, "--trust-remote-code", help="Allow a hub model's own Python code to run.")
ProgressOpt = typer.Option(True, "--progress/--no-progress", help="Progress bars on stderr.")
LimitOpt = typer.Option(None, "--limit", help="Zero-shot: only the first N examples of each task.")
ZsBatchOpt = typer.Option(None, "--eval-batch-size", help="Zero-shot: requests per forward pass (default 1 on CPU, 16 on GPU).")


_session = {"debug": False, "command": None}  # set by the global options, read by run() when a command fails


@app.callback()
def _global_options(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", envvar="LLMPRUNE_DEBUG",
                               help="On an unexpected error, print the full traceback (also LLMPRUNE_DEBUG=1)."),
) -> None:
    _session.update(debug=debug, command=ctx.invoked_subcommand)


def _fail(exc: Exception) -> None:
    console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _interrupted(exc: Exception) -> None:
    console.print(f"[bold yellow]stopped:[/] {exc}", highlight=False, soft_wrap=True)
    raise typer.Exit(130)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _zero_shot_table(section: dict, title: str) -> Table:
    runs = list(section["mean"])  # "dense", "pruned", or one unnamed run
    table = Table(title=title)
    table.add_column("task")
    table.add_column("n", justify="right")
    for run in runs:
        table.add_column(f"{run} acc".strip(), justify="right")
        table.add_column(f"{run} acc_norm".strip(), justify="right")
    for name, info in section["tasks"].items():
        cells = []
        for run in runs:
            r = info[run] if run else info
            cells += [_fmt(r["acc"]), _fmt(r["acc_norm"])]
        table.add_row(name, str(info["samples"]), *cells)
    means = []
    for run in runs:
        m = section["mean"][run]
        means += [_fmt(m["acc"]), _fmt(m["acc_norm_or_acc"])]
    table.add_row("mean", "", *means)
    return table


def _print_summary(report: dict, report_path: Path | None = None, out: Path | None = None) -> None:
    table = Table(title=f"{report['model']['spec']}: {report['method']} {report['pattern']}",
                  caption=f"perplexity: lower is better; {report['device']}, {report['dtype']}" if report["perplexity"] else None)
    table.add_column("set")
    table.add_column("seqlen x windows", justify="right")
    table.add_column("dense ppl", justify="right")
    table.add_column("pruned ppl", justify="right")
    for name, row in report["perplexity"].items():
        table.add_row(name, f"{row['seqlen']} x {row['windows']}", _fmt(row["dense"]), _fmt(row["pruned"]))
    Console().print(table)
    if report.get("zero_shot"):
        h = report["zero_shot"]["harness"]
        Console().print(_zero_shot_table(report["zero_shot"], f"zero-shot (lm-eval {h['lm_eval']}, 0-shot, "
                                                             f"limit {h['limit']}; mean acc_norm uses acc where a task has no acc_norm)"))
    t = report["time"]
    say = Console(soft_wrap=True, highlight=False).print  # whole lines: a narrow terminal folds them, never cuts
    say(f"sparsity {report['sparsity_overall']:.4f} (target {report['sparsity_target']:.4f}) on {report['device']} "
        f"in {report['dtype']}")
    say(f"time: load {t['load_s']:.1f}s  prune {t['prune_s']:.1f}s  save {t.get('save_s', 0.0):.1f}s  "
        f"eval {t['eval_s']:.1f}s")
    if out is not None:
        say(f"pruned model saved in {out}")
    if report_path is not None:
        say(f"report written to {report_path}")
    for note in report.get("warnings", [])[:3]:
        console.print(f"[bold yellow]warning:[/] {note}", highlight=False, soft_wrap=True)
    if len(report.get("warnings", [])) > 3:
        console.print(f"({len(report['warnings']) - 3} more warnings in the report)", highlight=False)


@app.command()
def prune(
    model: str = ModelOpt,
    method: str = typer.Option("wanda", "--method", help="wanda | wanda-variant | ria | sparsegpt | magnitude"),
    sparsity: float = typer.Option(0.5, "--sparsity", help="Fraction in [0, 1) for unstructured."),
    pattern: str = typer.Option("unstructured", "--pattern", help="unstructured, or N:M (e.g. 2:4, 4:8, 1:4)."),
    layerwise: str = typer.Option("uniform", "--layerwise", help="Per-block sparsity (unstructured): uniform | owl | comma list | file of sparsities."),
    owl_m: float = typer.Option(5.0, "--owl-m", help="OWL: a score is an outlier above M x its block's mean score."),
    owl_lambda: float = typer.Option(0.08, "--owl-lambda", help="OWL: block sparsities stay within --sparsity +- lambda."),
    permute: bool = typer.Option(False, "--permute", help="N:M: choose masks on permuted input channels (wanda, ria, magnitude)."),
    update: str = typer.Option("none", "--update", help="none | lsq: re-fit the kept weights by least squares after the mask."),
    refine: str = typer.Option("none", "--refine", help="none | dsnot: refine a score method's mask by DSnoT's pruning-and-growing (before any --update)."),
    dsnot_cycles: Optional[int] = typer.Option(None, "--dsnot-cycles", help="DSnoT: at most this many swaps per row (default 50)."),
    dsnot_threshold: Optional[float] = typer.Option(None, "--dsnot-threshold", help="DSnoT: a row stops once its expected error per token |eps| is at most this (default 0.1)."),
    calib: str = typer.Option("c4", "--calib", help="c4 | wikitext2 | path to a .txt or .jsonl (text field) file."),
    nsamples: int = typer.Option(128, "--nsamples", help="Number of calibration windows."),
    seqlen: int = typer.Option(2048, "--seqlen", help="Calibration window length in tokens."),
    seed: int = typer.Option(0, "--seed", help="Seed of the calibration sampler."),
    calib_tokens: Optional[Path] = typer.Option(None, "--calib-tokens", help="A .npy int array (or a .pt tensor) [nsamples, seqlen] of token ids, used exactly."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    batch_size: int = typer.Option(8, "--batch-size", help="Calibration windows per forward pass."),
    activations: str = typer.Option("auto", "--activations", help="auto | gpu | cpu: where calibration hidden states live between blocks (auto: on the GPU when they fit, else pinned CPU memory)."),
    weights: str = typer.Option("auto", "--weights", help="auto | gpu | cpu: where the model's weights live while it is pruned on a GPU (auto: all on the GPU when the memory estimate fits, else cpu; gpu: all on the GPU, no block travels; cpu: in CPU memory, each block visits the GPU)."),
    stream_from_disk: bool = typer.Option(False, "--stream-from-disk", help="Read one block at a time from the model folder's safetensors files and write the pruned model block by block to --out (for models larger than CPU memory; needs --out and --eval '')."),
    eval_sets: str = EvalOpt,
    eval_seqlen: Optional[int] = EvalSeqOpt,
    max_eval_windows: Optional[int] = MaxWinOpt,
    eval_tasks: str = typer.Option("", "--eval-tasks", help="Zero-shot tasks through lm-eval, dense and pruned: "
                                   "boolq, rte, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa, piqa."),
    limit: Optional[int] = LimitOpt,
    eval_batch_size: Optional[int] = ZsBatchOpt,
    out: Optional[Path] = typer.Option(None, "--out", help="Save the pruned model (HF folder, safetensors) here."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out folder, or discard an unfinished run into it with other settings."),
    format: str = typer.Option("dense", "--format", help="dense (HF checkpoint with zeros) | compressed (packed; load with llmprune.load)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write the run's report (JSON) here."),
    data_dir: Optional[Path] = DataDirOpt,
    trust_remote_code: bool = TrustOpt,
    progress: bool = ProgressOpt,
) -> None:
    """Prune a model in one shot, evaluating it before and after.

    With --out, the output is built in a hidden sibling folder, one shard per block written as the
    run goes; that is also the saved progress: running the same command again after a crash or
    Ctrl-C continues from the last finished block (streamed and torchrun runs too).
    Under `torchrun --nproc-per-node K -m llmprune prune ...` the calibration batches are split over
    the K processes (one GPU each) and their statistics summed; rank 0 evaluates, reports and saves.
    """
    options = dict(locals())
    from . import distributed

    world = None
    try:
        world, options["device"] = distributed.init(device)
        _prune(world=world, **options)
    except UsageError as exc:
        _fail(exc)
    except Exception as exc:
        from .checkpoint import Interrupted

        if isinstance(exc, Interrupted):
            _interrupted(exc)
        raise
    finally:
        if world is not None:
            distributed.finish(world)


def _prune(*, world, model, method, sparsity, pattern, layerwise, owl_m, owl_lambda, permute, update, refine,
           dsnot_cycles, dsnot_threshold, calib, nsamples,
           seqlen, seed, calib_tokens, device, dtype, batch_size, activations, weights, stream_from_disk, eval_sets, eval_seqlen,
           max_eval_windows, eval_tasks, limit, eval_batch_size, out, overwrite, format, report, data_dir,
           trust_remote_code, progress):
    from . import api, checkpoint, data, devices, export, integrity, layout, loading, report as report_mod, zeroshot
    startup_s = report_mod.process_age_s()  # interpreter, imports and parsing, before any of this command's work
    from .config import Calibration, DSnoT, EvalSettings, parse_sets
    from .layerwise import OWL, parse_layerwise
    from .methods import as_refine, get_method
    from .models import find_decoder
    from .patterns import Unstructured, parse_pattern

    # every string is checked before the model is loaded
    refine_obj = as_refine(refine)
    if refine_obj is None and (dsnot_cycles is not None or dsnot_threshold is not None):
        raise UsageError("--dsnot-cycles and --dsnot-threshold set DSnoT's refinement: add --refine dsnot")
    if refine_obj is not None:
        defaults = DSnoT()
        refine_obj = DSnoT(defaults.cycles if dsnot_cycles is None else dsnot_cycles,
                           defaults.threshold if dsnot_threshold is None else dsnot_threshold)
    method_obj = get_method(method, permute=permute, update=update, refine=refine_obj)
    pattern_obj = parse_pattern(pattern, sparsity)
    layerwise_obj = parse_layerwise(layerwise)
    if isinstance(layerwise_obj, OWL):
        layerwise_obj = OWL(owl_m, owl_lambda)
    if layerwise_obj is not None and not isinstance(pattern_obj, Unstructured):
        raise UsageError(f"--layerwise works with unstructured sparsity only, not --pattern {pattern_obj}")
    if permute and isinstance(pattern_obj, Unstructured):
        raise UsageError("--permute only changes N:M masks; use it with --pattern N:M")
    calibration = Calibration(calib, nsamples, seqlen, seed)
    main = world.is_main  # the other ranks only take their share of the calibration work
    extra_sets, zs_tasks = zeroshot.split_task_list(eval_tasks, flag="--eval-tasks")
    sets = tuple(dict.fromkeys(parse_sets(eval_sets) + extra_sets))
    settings = EvalSettings(sets if main else (), eval_seqlen or seqlen, max_eval_windows)
    zs_settings = zeroshot.ZeroShotSettings(zs_tasks, limit, eval_batch_size) if zs_tasks and main else None
    if activations not in ("auto", "gpu", "cpu"):
        raise UsageError(f"--activations must be auto, gpu or cpu, got {activations!r}")
    dev = devices.resolve_device(device)
    dt = devices.resolve_dtype(dtype, dev)
    _check_weights(weights, dev, stream_from_disk)
    export.check_format(format)
    if permute and format == "compressed":
        raise UsageError("--permute leaves masks that are N:M only in a permuted column order, which --format compressed "
                         "cannot store as N:M; save with --format dense")
    if stream_from_disk and out is None:
        raise UsageError("--stream-from-disk writes the pruned model block by block: give --out DIR")
    if stream_from_disk and (settings.sets or zs_tasks):
        raise UsageError("--stream-from-disk never holds the whole model, so it cannot evaluate it: pass "
                         "--eval '' (and no --eval-tasks) and evaluate the saved folder with `llmprune eval --model DIR`")
    if stream_from_disk and format != "dense":
        raise UsageError("--stream-from-disk writes a dense Hugging Face folder; drop --format or use --format dense")
    if out is not None:
        export.check_output_dir(out, overwrite)
    if report is not None and report.is_dir():
        raise UsageError(f"--report {report} is a folder; give a file path such as run.json")
    if report is not None:
        integrity.check_writable(report, "--report")
    if calib_tokens is not None and not calib_tokens.is_file():
        raise UsageError(f"--calib-tokens {calib_tokens}: no such file")
    if calib_tokens is None and (method_obj.needs or isinstance(layerwise_obj, OWL)):
        data.check_calibration_source(calib)  # a bad file is refused before the model is loaded
    ddir = data.data_dir(data_dir)
    if zs_settings is not None:
        zeroshot.require_lm_eval()
        zeroshot.check_local_data(zs_settings.tasks, ddir)

    devices.reset_peak_memory()
    t0 = time.perf_counter()
    placement = None
    if stream_from_disk:
        lm, tok, info, placement = _open_streamed(model, dt, trust_remote_code)
    else:
        lm, tok, info = loading.load_model(model, dt, trust_remote_code, progress and main)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    find_decoder(lm)  # an unsupported architecture is refused before any evaluation
    in_place = format == "dense" and layout.direct_layout_supported(lm)  # the work folder becomes --out
    if placement is not None and not in_place:
        raise UsageError("--stream-from-disk: transformers saves this architecture under other tensor names than it "
                         "loads; prune it without --stream-from-disk")
    tokens = data.load_token_file(calib_tokens, lm.config.get_text_config().vocab_size) if calib_tokens else None
    if tokens is None and (method_obj.needs or isinstance(layerwise_obj, OWL)):  # sample now: bad input fails early
        tokens = api.calibration_tokens(lm, tok, calibration, ddir)
    else:
        calibration = None  # the report then describes the given token file
    calib_data_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    windows = api.eval_windows(lm, tok, settings, ddir) if settings.sets else None
    eval_s = time.perf_counter() - t0

    def evaluate(label: str):
        """Perplexity sets and zero-shot tasks of the model as it is now; (ppl, zero-shot, seconds)."""
        t0 = time.perf_counter()
        ppl = api.perplexities(lm, windows, settings, dev, progress, label=label) if settings.sets else {}
        zs = None
        if zs_settings is not None:
            lm.to(dev)
            zs = zeroshot.evaluate_zero_shot(lm, tok, zs_settings, ddir, progress, label=label)
        return ppl, zs, time.perf_counter() - t0

    dense_ppl, dense_zs, seconds = evaluate("dense")
    eval_s += seconds
    if settings.sets or zs_settings is not None:
        lm.to("cpu")
    where = _place_weights(lm, weights, dev, tokens, batch_size, method_obj.needs, activations) if placement is None \
        else "streamed"
    # progress is saved block by block in the work folder (rank 0 writes, every rank reads it on resume)
    work = checkpoint.work_dir_for(out) if out is not None else None
    result = api.prune(lm, tok, method=method_obj, pattern=pattern_obj, calibration=calibration,
                       calib_tokens=tokens, device=dev, batch_size=batch_size, data_dir=ddir, progress=progress and main,
                       layerwise=layerwise_obj, activations=activations, world=world, placement=placement,
                       checkpoint_dir=work, overwrite=overwrite)
    if not main:  # every rank holds the same pruned model; rank 0 evaluates, reports and saves it
        return
    pruned_ppl, pruned_zs, seconds = evaluate("pruned")
    eval_s += seconds
    t0 = time.perf_counter()
    keep = f"; the pruned blocks are kept in {work}: re-run the same command to finish"
    staged = _stage_output(lm, tok, out, work, in_place, format, overwrite, pattern_obj, keep) if out else None
    save_s = result.save_s + time.perf_counter() - t0
    t0 = time.perf_counter()
    weights_sha = integrity.state_sha256(lm, result.tensor_sha256) if placement is None else None
    hash_s = time.perf_counter() - t0
    payload = report_mod.build_report(
        model=info, result=result, device=dev, dtype=dt,
        times={"load_s": load_s, "calib_data_s": calib_data_s, "prune_s": result.prune_s, "eval_s": eval_s,
               "save_s": save_s, "hash_s": hash_s, "startup_s": startup_s},
        peak=devices.peak_memory_bytes(), dense_ppl=dense_ppl, pruned_ppl=pruned_ppl, eval_settings=settings,
        zero_shot=report_mod.zero_shot_table(dense_zs, pruned_zs),
        extra={"command": sys.argv, "processes": world.size, "weights": where,
               "weights_sha256": weights_sha,
               "bytes_written": result.bytes_written + (staged.bytes_written if staged else 0),
               **({"storage": staged.storage} if staged is not None and staged.storage else {})},
    )
    if staged is not None:
        export.seal(staged, out, payload, keep)
        checkpoint.Checkpoint.remove(work)  # (gone already when the work folder became the output)
    if report is not None:
        report_mod.write_json(report, payload)
    if staged is not None and staged.storage:
        st = staged.storage
        Console().print(f"pruned Linear weights: {st['linear_stored_bytes'] / 2**20:.1f} MiB stored vs "
                        f"{st['linear_dense_bytes'] / 2**20:.1f} MiB dense ({st['linear_ratio']:.3f}x)", highlight=False)
    _print_summary(payload, report, out)


def _check_weights(weights: str, dev, stream_from_disk: bool) -> None:
    if weights not in ("auto", "gpu", "cpu"):
        raise UsageError(f"--weights must be auto, gpu or cpu, got {weights!r}")
    if weights == "gpu" and stream_from_disk:
        raise UsageError("--stream-from-disk reads each block from disk when it is pruned; drop --weights gpu")
    if weights == "gpu" and dev.type != "cuda":
        raise UsageError(f"--weights gpu places the model on a GPU, but --device is {dev}; use --device cuda or --weights auto")


def _place_weights(lm, weights: str, dev, tokens, batch_size: int, needs, activations: str) -> str:
    """Move the whole model to the GPU when asked, or (auto) when it fits beside the run; where the weights are."""
    from . import devices, memory

    if dev.type != "cuda" or weights == "cpu":
        return "cpu"
    n, length = (tokens.shape[0], tokens.shape[1]) if tokens is not None else (0, 0)
    fits = memory.whole_model_fits(lm, n, length, batch_size, needs, dev, activations, devices.free_bytes(dev),
                                   devices.cpu_free_bytes())
    if not fits and weights == "gpu":
        size = sum(t.numel() * t.element_size() for t in [*lm.parameters(), *lm.buffers()]) / memory.GiB
        raise UsageError(f"--weights gpu: the model ({size:.1f} GiB) and the run do not fit on {dev} together; "
                         "use --weights cpu (each block visits the GPU) or --weights auto")
    if not fits:
        return "cpu"
    lm.to(dev)
    return "gpu"


def _stage_output(lm, tok, out, work, in_place, format, overwrite, pattern, keep):
    """The output but for its report and manifest: the work folder's block shards completed in place, or
    (compressed, or a model saved under renamed keys) a fresh save beside ``out``."""
    from . import checkpoint, export

    if in_place:
        return export.finish_dense(work, lm, tok, checkpoint.read_state(work)["shards"])
    lm.to("cpu")
    return export.stage_pruned(lm, tok, out, overwrite, format=format, pattern=pattern, after_error=keep)


def _open_streamed(spec, dtype, trust_remote_code):
    """The model with its blocks left on disk, and the placement that streams them."""
    from transformers import AutoTokenizer

    from . import loading, streaming

    kind, location = loading.resolve_source(spec)
    if kind == "hub":
        raise UsageError(f"--stream-from-disk needs a local model folder; {spec} is not one (download it first)")
    folder = loading.gguf_to_folder(location) if kind == "gguf" else location
    lm, reader = streaming.open_model(folder, dtype, trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):  # a folder without tokenizer files still prunes with --calib-tokens
        tok = None
    return lm, tok, {"spec": spec, "kind": kind, "path": location, "streamed": True}, streaming.DiskBlocks(lm, reader)


@app.command("eval")
def eval_cmd(
    model: str = ModelOpt,
    tasks: str = typer.Option("", "--tasks", help="Comma list: zero-shot tasks through lm-eval (boolq, rte, hellaswag, "
                              "winogrande, arc_easy, arc_challenge, openbookqa, piqa) and/or perplexity sets (wikitext2, ptb, c4)."),
    eval_sets: Optional[str] = typer.Option(None, "--eval", help="Comma list of perplexity sets (default: wikitext2 "
                                            "when --tasks is not given)."),
    eval_seqlen: Optional[int] = typer.Option(None, "--eval-seqlen", help="Evaluation window length (default: the "
                                              "window the prune run that saved --model evaluated with, else 2048)."),
    max_eval_windows: Optional[int] = MaxWinOpt,
    limit: Optional[int] = LimitOpt,
    eval_batch_size: Optional[int] = ZsBatchOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    report: Optional[Path] = typer.Option(None, "--report", help="Write the results (JSON) here."),
    data_dir: Optional[Path] = DataDirOpt,
    trust_remote_code: bool = TrustOpt,
    progress: bool = ProgressOpt,
) -> None:
    """Evaluate any model: perplexity the same way `prune` does, zero-shot accuracy through lm-eval."""
    try:
        from . import api, data, devices, loading, report as report_mod, zeroshot
        from .config import EvalSettings, parse_sets

        ppl_sets, zs_tasks = zeroshot.split_task_list(tasks)
        if eval_sets is None:
            eval_sets = "" if tasks.strip() else "wikitext2"
        if eval_seqlen is None:
            eval_seqlen = _saved_eval_seqlen(model, progress) or 2048
        settings = EvalSettings(tuple(dict.fromkeys(parse_sets(eval_sets) + ppl_sets)), eval_seqlen, max_eval_windows)
        zs_settings = zeroshot.ZeroShotSettings(zs_tasks, limit, eval_batch_size) if zs_tasks else None
        if not settings.sets and zs_settings is None:
            raise UsageError("nothing to evaluate: give --tasks (e.g. --tasks boolq,rte,wikitext2) or --eval")
        dev = devices.resolve_device(device)
        dt = devices.resolve_dtype(dtype, dev)
        ddir = data.data_dir(data_dir)
        if zs_settings is not None:
            zeroshot.require_lm_eval()
            zeroshot.check_local_data(zs_settings.tasks, ddir)
        if report is not None and report.is_dir():
            raise UsageError(f"--report {report} is a folder; give a file path such as eval.json")
        if report is not None:
            from .integrity import check_writable

            check_writable(report, "--report")
        t0 = time.perf_counter()
        lm, tok, info = loading.load_model(model, dt, trust_remote_code, progress)
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ppl = api.evaluate_perplexity(lm, tok, settings, dev, ddir, progress) if settings.sets else {}
        zs = None
        if zs_settings is not None:
            lm.to(dev)
            zs = zeroshot.evaluate_zero_shot(lm, tok, zs_settings, ddir, progress)
        payload = {
            "model": info, "device": str(dev), "dtype": str(dt).replace("torch.", ""),
            "perplexity": {k: {"perplexity": v.perplexity, "seqlen": v.seqlen, "windows": v.windows} for k, v in ppl.items()},
            "time": {"load_s": load_s, "eval_s": time.perf_counter() - t0},
            "peak_memory_bytes": devices.peak_memory_bytes(), "versions": report_mod.versions(),
        }
        if zs is not None:
            payload["zero_shot"] = {"harness": zs["harness"], "tasks": zs["tasks"], "mean": {"": zs["mean"]}}
        if report is not None:
            report.parent.mkdir(parents=True, exist_ok=True)
            report_mod.write_json(report, payload)
        if ppl:
            table = Table(title=f"{model}")
            for col in ("set", "seqlen x windows", "perplexity"):
                table.add_column(col)
            for name, v in ppl.items():
                table.add_row(name, f"{v.seqlen} x {v.windows}", f"{v.perplexity:.3f}")
            Console().print(table)
        if zs is not None:
            h = zs["harness"]
            Console().print(_zero_shot_table(payload["zero_shot"], f"{model}: zero-shot (lm-eval {h['lm_eval']}, "
                                             f"0-shot, limit {h['limit']})"))
    except UsageError as exc:
        _fail(exc)


def _saved_eval_seqlen(model: str, progress: bool) -> int | None:
    """The window length the prune run that saved the folder ``model`` evaluated with (its own --seqlen when
    it evaluated nothing), so that `llmprune eval DIR` prints the numbers the run printed."""
    from .integrity import REPORT_NAME

    path = Path(model).expanduser() / REPORT_NAME
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    seqlens = [row.get("seqlen") for row in (saved.get("perplexity") or {}).values()]
    seqlen = next((s for s in seqlens if isinstance(s, int)), None) or (saved.get("calibration") or {}).get("seqlen")
    if isinstance(seqlen, int) and progress:
        console.print(f"evaluating with {seqlen}-token windows, as the run that saved {model} did "
                      "(--eval-seqlen to change)", highlight=False)
    return seqlen if isinstance(seqlen, int) else None


@app.command()
def compare(
    runs: list[Path] = typer.Argument(..., help="Report files (JSON) of `llmprune prune --report` / `llmprune eval --report`."),
    plots: Path = typer.Option(Path("compare-plots"), "--plots", help="Folder for the PNG plots."),
    no_plots: bool = typer.Option(False, "--no-plots", help="Print the table only."),
) -> None:
    """Compare runs: a table (dense first, then method x pattern) and PNG plots."""
    try:
        from . import compare as compare_mod

        rows, columns = compare_mod.table_rows(compare_mod.load_reports(runs))
        table = Table(title="llmprune compare")
        for col in ("method", "pattern", "sparsity", *columns):
            table.add_column(col, justify="left" if col in ("method", "pattern") else "right")
        for row in rows:
            table.add_row(row["method"], row["pattern"], _fmt(row["sparsity"]),
                          *[compare_mod.fmt(c, row["metrics"].get(c)) for c in columns])
        Console().print(table)
        if not no_plots:
            for path in compare_mod.write_plots(compare_mod.load_reports(runs), plots):
                console.print(f"wrote {path}", highlight=False)
    except UsageError as exc:
        _fail(exc)


def run(argv: list[str] | None = None) -> int:
    """Run the command line on ``argv``; returns the exit code.

    Every usage error, typer's own included, is one ``error:`` line (exit 2); any other exception is one
    ``error:`` line naming the command, the place and the exception (exit 1; the traceback with --debug);
    Ctrl-C exits with 130.
    """
    try:  # typer >= 0.2x carries its own click
        from typer import TyperException as ParseError
    except ImportError:
        from click import ClickException as ParseError

    _session.update(debug=False, command=None)
    try:
        code = app(args=argv, prog_name="llmprune", standalone_mode=False)
    except typer.Abort:
        return 130
    except UsageError as exc:  # a command that let one through
        console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        return 2
    except ParseError as exc:
        ctx = getattr(exc, "ctx", None)
        command = f" {ctx.info_name}" if ctx is not None and ctx.parent is not None else ""
        text = " ".join((exc.format_message() if hasattr(exc, "format_message") else str(exc)).split()).rstrip(".")
        if text:  # (empty: the help was shown because no arguments were given)
            console.print(f"[bold red]error:[/] {text}; see llmprune{command} --help", highlight=False, soft_wrap=True)
        return 2
    except Exception as exc:
        _unexpected(exc)
        return 1
    return code if isinstance(code, int) else 0


def _unexpected(exc: Exception) -> None:
    """An error that is not the user's: one line naming the command, the place and the exception; the
    traceback too with --debug."""
    if _session["debug"]:
        traceback.print_exception(exc, file=sys.stderr)
    command = " ".join(filter(None, ["llmprune", _session["command"]]))
    text = " ".join(str(exc).split()) or "(no message)"
    if len(text) > 500:
        text = text[:500] + "..."
    hint = "" if _session["debug"] else "; run again with --debug for the traceback"
    console.print(f"[bold red]error:[/] {escape(f'{command} failed{_where(exc)}: {type(exc).__name__}: {text}{hint}')}",
                  highlight=False, soft_wrap=True)


def _where(exc: BaseException) -> str:
    """`` in module.py:LINE (function)`` for the innermost frame of this package, or ''."""
    package = Path(__file__).resolve().parent
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).resolve().is_relative_to(package)]
    if not frames:
        return ""
    f = frames[-1]
    return f" in {Path(f.filename).resolve().relative_to(package.parent)}:{f.lineno} ({f.name})"


def main() -> None:
    from .devices import bound_cpu_heap, tune_cpu_allocator

    if "--stream-from-disk" in sys.argv:  # a heap that keeps freed buffers would keep every block read
        bound_cpu_heap()
    else:
        tune_cpu_allocator()
    sys.exit(run())


if __name__ == "__main__":
    main()
