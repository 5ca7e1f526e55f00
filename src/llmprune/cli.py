"""Command line: wiring only. Parses strings once, builds the typed options, calls the API."""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import UsageError
from .methods import METHODS

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

StructureOpt = typer.Option(None, "--structure", help="Structured pruning into a smaller dense model: comma list of mlp (intermediate channels), heads (whole KV groups with their query heads), blocks (ShortGPT block importance).")
RemoveOpt = typer.Option(None, "--remove", help="--structure: fraction in (0, 1) of the decoder blocks' parameters to remove (uniform widths).")
WidthsOpt = typer.Option(None, "--widths", help="--structure: explicit widths instead of --remove, e.g. intermediate_size=1216,num_key_value_heads=2,num_hidden_layers=26.")
ImportanceOpt = typer.Option("wanda-sp", "--importance", help="--structure: channel score: wanda-sp | flap | magnitude, or obs (greedy structured OBS on the consuming layer's Hessian).")
RestoreOpt = typer.Option("none", "--restore", help="--structure: none | lsq (re-fit down_proj/o_proj on the kept channels) | lsq-dense (the same re-fit onto the unshrunk model's outputs) | bias (FLAP's compensation bias; Llama, and heads of Gemma 3 / Qwen3).")
ObjectiveOpt = typer.Option("output", "--objective", help="--structure: what --restore lsq and --importance obs minimise: output (the consuming layer's output error) | post-norm (the error after the norm Gemma 2/3 and OLMo 2 blocks put on that output, each token weighted by 1/its output's mean square).")
AllocationOpt = typer.Option("uniform", "--allocation", help="--structure: MLP widths: uniform (the same in every block; a standard config, the default) | adaptive (FLAP's adaptive search: channel scores standardised per block and ranked over all blocks; the saved folder loads with llmprune.load or llmprune eval, not plain from_pretrained).")
WidthMultipleOpt = typer.Option(32, "--width-multiple", help="--structure: the intermediate size is rounded to a multiple of this.")
OwlMOpt = typer.Option(5.0, "--owl-m", help="OWL: a score is an outlier above M x its block's mean score.")
OwlLambdaOpt = typer.Option(0.08, "--owl-lambda", help="OWL: the spread of block sparsities around --sparsity (paper: a band 2 x lambda wide; llmprune: within +- lambda).")
OwlVariantOpt = typer.Option(None, "--owl-variant", help="OWL: paper (the OWL code's min-max mapping, default) | llmprune (blocks within --sparsity +- lambda).")
DsnotCyclesOpt = typer.Option(None, "--dsnot-cycles", help="DSnoT: at most this many swaps per row (default 50).")
DsnotThresholdOpt = typer.Option(None, "--dsnot-threshold", help="DSnoT: a row stops once its error |eps| is at most this (default 0.1; per calibration window for paper, per token for llmprune).")
DsnotVariantOpt = typer.Option(None, "--dsnot-variant", help="DSnoT: paper (the DSnoT code's error scale and swap rules, default) | llmprune (error per token; a swap must lower |eps|; N:M prunes by Wanda's score, opposite sign).")

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


def _print_outcome(outcome) -> None:
    storage = outcome.storage
    if storage:
        Console().print(f"pruned Linear weights: {storage['linear_stored_bytes'] / 2**20:.1f} MiB stored vs "
                        f"{storage['linear_dense_bytes'] / 2**20:.1f} MiB dense ({storage['linear_ratio']:.3f}x)",
                        highlight=False)
    _print_summary(outcome.report, outcome.report_path, outcome.out)


def _say_structured(say, report: dict) -> None:
    st = report["structured"]
    w, p = st["widths"], st["params"]
    sizes = sorted({b["intermediate_size"] for b in st.get("blocks", [])})
    mlp = f"{sizes[0]}..{sizes[-1]} (per block; load with llmprune.load)" if len(sizes) > 1 else w["intermediate_size"]
    say(f"widths: intermediate_size {st['widths_before']['intermediate_size']} -> {mlp}, "
        f"num_key_value_heads {st['widths_before']['num_key_value_heads']} -> {w['num_key_value_heads']}, "
        f"num_hidden_layers {st['widths_before']['num_hidden_layers']} -> {w['num_hidden_layers']}")
    say(f"decoder parameters {p['decoder_before']:,} -> {p['decoder_after']:,} ({100 * st['removed_fraction']:.1f}% "
        f"removed; whole model {100 * st['model_removed_fraction']:.1f}%) on {report['device']} in {report['dtype']}")


def _print_summary(report: dict, report_path: Path | None = None, out: Path | None = None) -> None:
    kind = report.get("pattern") or ",".join(report["structured"]["settings"]["structures"])
    table = Table(title=f"{report['model']['spec']}: {report['method']} {kind}",
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
    if "structured" in report:
        _say_structured(say, report)
    else:
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
    method: str = typer.Option("wanda", "--method", help=" | ".join(METHODS)),
    sparsity: float = typer.Option(0.5, "--sparsity", help="Fraction in [0, 1) for unstructured."),
    pattern: str = typer.Option("unstructured", "--pattern", help="unstructured, or N:M (e.g. 2:4, 4:8, 1:4)."),
    scope: Optional[str] = typer.Option(None, "--scope", help="Unstructured: row | matrix, where scores are compared (default: the method's own; row for wanda, matrix for magnitude and ria)."),
    layerwise: str = typer.Option("uniform", "--layerwise", help="Per-block sparsity (unstructured): uniform | owl | comma list | file of sparsities."),
    owl_m: float = OwlMOpt, owl_lambda: float = OwlLambdaOpt, owl_variant: Optional[str] = OwlVariantOpt,
    permute: bool = typer.Option(False, "--permute", help="N:M: choose masks on permuted input channels (wanda, ria, magnitude, alps)."),
    update: str = typer.Option("none", "--update", help="none | lsq: re-fit the kept weights by least squares after the mask."),
    refine: str = typer.Option("none", "--refine", help="none | dsnot: refine a score method's mask by DSnoT's pruning-and-growing (before any --update)."),
    dsnot_cycles: Optional[int] = DsnotCyclesOpt, dsnot_threshold: Optional[float] = DsnotThresholdOpt,
    dsnot_variant: Optional[str] = DsnotVariantOpt,
    structure: Optional[str] = StructureOpt, remove: Optional[float] = RemoveOpt, widths: Optional[str] = WidthsOpt,
    importance: str = ImportanceOpt, restore: str = RestoreOpt, width_multiple: int = WidthMultipleOpt,
    objective: str = ObjectiveOpt, allocation: str = AllocationOpt,
    calib: str = typer.Option("c4", "--calib", help="c4 | wikitext2 | path to a .txt or .jsonl (text field) file."),
    nsamples: int = typer.Option(128, "--nsamples", help="Number of calibration windows."),
    seqlen: int = typer.Option(2048, "--seqlen", help="Calibration window length in tokens."),
    seed: int = typer.Option(0, "--seed", help="Seed of the calibration sampler."),
    calib_tokens: Optional[Path] = typer.Option(None, "--calib-tokens", help="A .npy int array (or a .pt tensor) [nsamples, seqlen] of token ids, used exactly."),
    device: str = DeviceOpt, dtype: str = DtypeOpt,
    batch_size: int = typer.Option(8, "--batch-size", help="Calibration windows per forward pass."),
    activations: str = typer.Option("auto", "--activations", help="auto | gpu | cpu: where calibration hidden states live between blocks (auto: on the GPU when they fit, else pinned CPU memory)."),
    weights: str = typer.Option("auto", "--weights", help="auto | gpu | cpu: where the model's weights live while it is pruned on a GPU (auto: all on the GPU when the memory estimate fits, else cpu; gpu: all on the GPU, no block travels; cpu: in CPU memory, each block visits the GPU)."),
    stream_from_disk: bool = typer.Option(False, "--stream-from-disk", help="Read one block at a time from the model folder's safetensors files and write the pruned model block by block to --out (for models larger than CPU memory; needs --out and --eval '')."),
    eval_sets: str = EvalOpt, eval_seqlen: Optional[int] = EvalSeqOpt, max_eval_windows: Optional[int] = MaxWinOpt,
    eval_tasks: str = typer.Option("", "--eval-tasks", help="Zero-shot tasks through lm-eval, dense and pruned: "
                                   "boolq, rte, hellaswag, winogrande, arc_easy, arc_challenge, openbookqa, piqa."),
    limit: Optional[int] = LimitOpt, eval_batch_size: Optional[int] = ZsBatchOpt,
    out: Optional[Path] = typer.Option(None, "--out", help="Save the pruned model (HF folder, safetensors) here."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out folder, or discard an unfinished run into it with other settings."),
    format: str = typer.Option("dense", "--format", help="dense (HF checkpoint with zeros) | compressed (packed; load with llmprune.load)."),
    report: Optional[Path] = typer.Option(None, "--report", help="Write the run's report (JSON) here."),
    data_dir: Optional[Path] = DataDirOpt,
    trust_remote_code: bool = TrustOpt,
    progress: bool = ProgressOpt,
) -> None:
    """Prune a model in one shot, evaluating it before and after.

    With --out, the output is built in a hidden sibling folder, one shard per block written as the run goes: the
    saved progress; the same command again after a crash or Ctrl-C continues from the last finished block (streamed
    and torchrun runs too). Under `torchrun --nproc-per-node K -m llmprune prune ...` the calibration batches are
    split over the K processes (one GPU each), their statistics summed; rank 0 evaluates, reports and saves.
    --structure: a smaller dense model.
    """
    from .job import PruneJob

    _run_prune(device, lambda world, dev: PruneJob.from_flags(
        model=model, method=method, sparsity=sparsity, pattern=pattern, scope=scope, layerwise=layerwise, owl_m=owl_m,
        owl_lambda=owl_lambda, owl_variant=owl_variant, permute=permute, update=update, refine=refine,
        dsnot_cycles=dsnot_cycles, dsnot_threshold=dsnot_threshold, dsnot_variant=dsnot_variant, calib=calib,
        nsamples=nsamples, seqlen=seqlen, seed=seed, calib_tokens=calib_tokens, device=dev, dtype=dtype,
        batch_size=batch_size, activations=activations, weights=weights, stream_from_disk=stream_from_disk,
        eval_sets=eval_sets, eval_seqlen=eval_seqlen, max_eval_windows=max_eval_windows, eval_tasks=eval_tasks,
        limit=limit, eval_batch_size=eval_batch_size, out=out, overwrite=overwrite, format=format, report=report,
        data_dir=data_dir, trust_remote_code=trust_remote_code, progress=progress, evaluates=world.is_main,
        structure=structure, remove=remove, widths=widths, importance=importance, restore=restore,
        width_multiple=width_multiple, objective=objective, allocation=allocation))


def _run_prune(device: str, make_job) -> None:
    """This process's place among torchrun's (or alone), the job built from the flags, the run, its summary."""
    from . import distributed
    from .checkpoint import Interrupted
    from .workflow import run_prune

    world = None
    try:
        world, device = distributed.init(device)
        outcome = run_prune(make_job(world, device), world)
        if outcome is not None:
            _print_outcome(outcome)
    except UsageError as exc:
        _fail(exc)
    except Interrupted as exc:
        _interrupted(exc)
    finally:
        if world is not None:
            distributed.finish(world)


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
        from .job import EvalJob
        from .workflow import run_eval, saved_eval_seqlen

        if eval_seqlen is None:
            eval_seqlen = saved_eval_seqlen(model)
            if eval_seqlen is not None and progress:
                console.print(f"evaluating with {eval_seqlen}-token windows, as the run that saved {model} did "
                              "(--eval-seqlen to change)", highlight=False)
        job = EvalJob.from_flags(model=model, tasks=tasks, eval_sets=eval_sets, eval_seqlen=eval_seqlen or 2048,
                                 max_eval_windows=max_eval_windows, limit=limit, eval_batch_size=eval_batch_size,
                                 device=device, dtype=dtype, report=report, data_dir=data_dir,
                                 trust_remote_code=trust_remote_code, progress=progress)
        payload, ppl, zs = run_eval(job)
        _print_eval(model, payload, ppl, zs)
    except UsageError as exc:
        _fail(exc)


def _print_eval(model: str, payload: dict, ppl: dict, zs: dict | None) -> None:
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
