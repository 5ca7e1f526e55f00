"""A whole run from a job: check, load, calibrate, evaluate, prune, evaluate again, save, report.

``run_prune`` is what `llmprune prune` does and what the benchmarks time; the command line only
builds the ``PruneJob`` and prints what comes back. Each step is a function of its own.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import api, checkpoint, data, devices, export, integrity, layout, loading, memory, surgery, zeroshot
from . import report as report_mod
from .errors import UsageError
from .job import EvalJob, PruneJob
from .models import find_decoder


@dataclass
class Outcome:
    """What a run leaves: its report, and where it was written."""

    report: dict
    out: Path | None = None
    report_path: Path | None = None
    storage: dict = field(default_factory=dict)
    """``--format compressed``: stored against dense bytes of the pruned Linear weights."""


def preflight(job: PruneJob) -> Path | None:
    """Checks that need the file system, before the model is loaded; the data folder."""
    if job.save.out is not None:
        export.check_output_dir(job.save.out, job.save.overwrite)
    if job.save.report is not None:
        integrity.check_writable(job.save.report, "--report")
    if job.calib_tokens is not None and not job.calib_tokens.is_file():
        raise UsageError(f"--calib-tokens {job.calib_tokens}: no such file")
    if job.calib_tokens is None and job.needs_calibration:
        data.check_calibration_source(job.calibration.source)  # a bad file is refused before the model is loaded
    ddir = data.data_dir(job.data_dir)
    if job.zero_shot is not None:
        zeroshot.require_lm_eval()
        zeroshot.check_local_data(job.zero_shot.tasks, ddir)
    return ddir


def load(job: PruneJob, show_progress: bool):
    """(model, tokenizer, model info, placement): placement is None, or the streamed blocks' reader."""
    if job.run.stream_from_disk:
        return open_streamed(job.model, job.run.dtype, job.trust_remote_code)
    lm, tok, info = loading.load_model(job.model, job.run.dtype, job.trust_remote_code, show_progress)
    return lm, tok, info, None


def open_streamed(spec: str, dtype, trust_remote_code: bool):
    """The model with its blocks left on disk, and the placement that streams them."""
    from transformers import AutoTokenizer

    from . import streaming

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


def calibration(job: PruneJob, lm, tok, ddir):
    """(tokens or None, the Calibration they were drawn from or None for a token file)."""
    if job.calib_tokens is not None:
        return data.load_token_file(job.calib_tokens, lm.config.get_text_config().vocab_size), None
    if job.needs_calibration:  # sampled now: bad input fails before any evaluation
        return api.calibration_tokens(lm, tok, job.calibration, ddir), job.calibration
    return None, None


def place_weights(lm, weights: str, dev, tokens, batch_size: int, needs, activations: str,
                  work: tuple[int, int] = memory.WORK_BYTES) -> str:
    """Move the whole model to the GPU when asked, or (auto) when it fits beside the run; where the weights are."""
    if dev.type != "cuda" or weights == "cpu":
        return "cpu"
    n, length = (tokens.shape[0], tokens.shape[1]) if tokens is not None else (0, 0)
    fits = memory.whole_model_fits(lm, n, length, batch_size, needs, dev, activations, devices.free_bytes(dev),
                                   devices.cpu_free_bytes(), work)
    if not fits and weights == "gpu":
        size = sum(t.numel() * t.element_size() for t in [*lm.parameters(), *lm.buffers()]) / memory.GiB
        raise UsageError(f"--weights gpu: the model ({size:.1f} GiB) and the run do not fit on {dev} together; "
                         "use --weights cpu (each block visits the GPU) or --weights auto")
    if not fits:
        return "cpu"
    lm.to(dev)
    return "gpu"


class Evaluator:
    """Perplexity sets and zero-shot tasks of the model as it is now, with their seconds added up."""

    def __init__(self, job: PruneJob, lm, tok, ddir) -> None:
        self.job, self.lm, self.tok, self.ddir = job, lm, tok, ddir
        t0 = time.perf_counter()
        self.windows = api.eval_windows(lm, tok, job.eval, ddir) if job.eval.sets else None
        self.seconds = time.perf_counter() - t0

    @property
    def active(self) -> bool:
        return bool(self.job.eval.sets) or self.job.zero_shot is not None

    def __call__(self, label: str):
        """(perplexities, zero-shot results or None) of the model now."""
        job, t0 = self.job, time.perf_counter()
        ppl = api.perplexities(self.lm, self.windows, job.eval, job.run.device, job.run.progress, label=label) \
            if job.eval.sets else {}
        zs = None
        if job.zero_shot is not None:
            self.lm.to(job.run.device)
            zs = zeroshot.evaluate_zero_shot(self.lm, self.tok, job.zero_shot, self.ddir, job.run.progress, label=label)
        self.seconds += time.perf_counter() - t0
        return ppl, zs


@dataclass
class Prepared:
    """What both runs have before they prune: the model loaded, its calibration tokens, its dense evaluation."""

    ddir: Path | None
    lm: object
    tok: object
    info: dict
    placement: object
    tokens: object
    drawn_from: object
    evaluate: Evaluator
    dense: tuple
    times: dict
    checked: object
    """What ``check`` returned (the sparse run: whether the work folder becomes --out)."""


def prepare(job: PruneJob, world, check) -> Prepared:
    """Check the job, load the model (CUDA starting meanwhile), ``check(lm, placement)`` before any heavy work
    (its answer kept as ``checked``),
    draw the calibration tokens, evaluate the dense model; the model is left on the CPU if it was evaluated."""
    startup_s = report_mod.process_age_s()  # interpreter, imports and parsing, before any of this run's work
    ddir = preflight(job)
    if not job.run.stream_from_disk:
        loading.prefetch(job.model)  # the kernel reads the weights from disk while CUDA starts
    cuda_init_s = devices.start_cuda(job.run.device)
    devices.reset_peak_memory()
    t0 = time.perf_counter()
    lm, tok, info, placement = load(job, job.run.progress and world.is_main)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    checked = check(lm, placement)  # an unsupported architecture or layout is refused before any evaluation
    tokens, drawn_from = calibration(job, lm, tok, ddir)
    calib_data_s = time.perf_counter() - t0
    evaluate = Evaluator(job, lm, tok, ddir)
    dense = evaluate("dense")
    if evaluate.active:
        lm.to("cpu")
    times = {"load_s": load_s, "calib_data_s": calib_data_s, "cuda_init_s": cuda_init_s, "startup_s": startup_s}
    return Prepared(ddir, lm, tok, info, placement, tokens, drawn_from, evaluate, dense, times, checked)


def _check_sparse(job: PruneJob):
    def check(lm, placement) -> bool:
        """The architecture is supported; returns whether the work folder becomes --out (a dense folder in the
        layout transformers loads), which --stream-from-disk needs."""
        find_decoder(lm)
        in_place = job.save.format == "dense" and layout.direct_layout_supported(lm)
        if placement is not None and not in_place:
            raise UsageError("--stream-from-disk: transformers saves this architecture under other tensor names "
                             "than it loads; prune it without --stream-from-disk")
        return in_place
    return check


def run_prune(job: PruneJob, world) -> Outcome | None:
    """The whole `llmprune prune`; None on the torchrun ranks other than 0 (rank 0 evaluates, saves, reports)."""
    if job.structure is not None:
        return run_structured(job, world)
    prep = prepare(job, world, _check_sparse(job))
    lm, placement, in_place = prep.lm, prep.placement, prep.checked
    t0 = time.perf_counter()
    where = "streamed" if placement is not None else place_weights(
        lm, job.run.weights, job.run.device, prep.tokens, job.run.batch_size, job.method.needs, job.run.activations,
        api.work_bytes(job.method))
    place_s = time.perf_counter() - t0  # the weights' copy to the GPU
    work = checkpoint.work_dir_for(job.save.out) if job.save.out is not None else None
    result = api.prune(lm, prep.tok, method=job.method, pattern=job.pattern, calibration=prep.drawn_from,
                       calib_tokens=prep.tokens, device=job.run.device, batch_size=job.run.batch_size,
                       data_dir=prep.ddir, progress=job.run.progress and world.is_main, layerwise=job.layerwise,
                       activations=job.run.activations, world=world, placement=placement, checkpoint_dir=work,
                       overwrite=job.save.overwrite)
    if not world.is_main:  # every rank holds the same pruned model; rank 0 evaluates, reports and saves it
        return None
    pruned = prep.evaluate("pruned")
    times = {**prep.times, "place_s": place_s, "prune_s": result.prune_s}
    return finish(job, lm, prep.tok, prep.info, result, (prep.dense, pruned), prep.evaluate.seconds, times, work,
                  in_place, placement, world, where)


def run_structured(job: PruneJob, world) -> Outcome:
    """`llmprune prune --structure ...`: load, calibrate, evaluate, shrink, evaluate again, save, report."""
    if world.size > 1:
        raise UsageError("--structure runs in one process; run it without torchrun")
    prep = prepare(job, world, lambda lm, _: surgery.check_supported(lm))
    lm, tok = prep.lm, prep.tok
    result = api.prune_structured(lm, tok, structure=job.structure, calibration=prep.drawn_from,
                                  calib_tokens=prep.tokens, device=job.run.device, batch_size=job.run.batch_size,
                                  data_dir=prep.ddir, progress=job.run.progress)
    pruned = prep.evaluate("pruned")
    t0 = time.perf_counter()
    staged = export.stage_pruned(lm.to("cpu"), tok, job.save.out, job.save.overwrite) if job.save.out else None
    times = {**prep.times, "prune_s": result.prune_s, "eval_s": prep.evaluate.seconds,
             "save_s": time.perf_counter() - t0}
    payload = report_mod.build_structured_report(
        model=prep.info, result=result, device=job.run.device, dtype=job.run.dtype, times=times,
        peak=devices.peak_memory_bytes(), dense_ppl=prep.dense[0], pruned_ppl=pruned[0], eval_settings=job.eval,
        zero_shot=report_mod.zero_shot_table(prep.dense[1], pruned[1]),
        extra={"command": sys.argv, "weights_sha256": integrity.state_sha256(lm),
               "bytes_written": staged.bytes_written if staged else 0})
    if staged is not None:
        export.seal(staged, job.save.out, payload)
    if job.save.report is not None:
        report_mod.write_json(job.save.report, payload)
    return Outcome(payload, job.save.out, job.save.report)


def finish(job: PruneJob, lm, tok, info, result, evaluations, eval_s: float, times: dict, work, in_place: bool,
           placement, world, where: str) -> Outcome:
    """Save (from the work folder's shards, or a fresh save), hash, report; the report written last."""
    (dense_ppl, dense_zs), (pruned_ppl, pruned_zs) = evaluations
    out = job.save.out
    keep = f"; the pruned blocks are kept in {work}: re-run the same command to finish"
    t0 = time.perf_counter()
    staged = stage_output(lm, tok, job, work, in_place, keep, result.permutations()) if out is not None else None
    save_s = result.save_s + time.perf_counter() - t0
    t0 = time.perf_counter()
    weights_sha = integrity.state_sha256(lm, result.tensor_sha256) if placement is None else None
    times = {**times, "eval_s": eval_s, "save_s": save_s, "hash_s": time.perf_counter() - t0}
    payload = report_mod.build_report(
        model=info, result=result, device=job.run.device, dtype=job.run.dtype, times=times,
        peak=devices.peak_memory_bytes(), dense_ppl=dense_ppl, pruned_ppl=pruned_ppl, eval_settings=job.eval,
        zero_shot=report_mod.zero_shot_table(dense_zs, pruned_zs),
        extra={"command": sys.argv, "processes": world.size, "weights": where, "weights_sha256": weights_sha,
               "bytes_written": result.bytes_written + (staged.bytes_written if staged else 0),
               **({"storage": staged.storage} if staged is not None and staged.storage else {})},
    )
    if staged is not None:
        export.seal(staged, out, payload, keep)
        checkpoint.Checkpoint.remove(work)  # (gone already when the work folder became the output)
    if job.save.report is not None:
        report_mod.write_json(job.save.report, payload)
    return Outcome(payload, out, job.save.report, (staged.storage or {}) if staged is not None else {})


def stage_output(lm, tok, job: PruneJob, work, in_place: bool, keep: str, perms: dict):
    """The output but for its report and manifest: the work folder's block shards completed in place, or
    (compressed, or a model saved under renamed keys) a fresh save beside ``--out``; ``perms``: the Linears'
    input orders of ``--permute`` (stored by the compressed format)."""
    if in_place:
        return export.finish_dense(work, lm, tok, checkpoint.read_state(work)["shards"])
    lm.to("cpu")
    return export.stage_pruned(lm, tok, job.save.out, job.save.overwrite, format=job.save.format, pattern=job.pattern,
                               after_error=keep, perms=perms)


def saved_eval_seqlen(model: str) -> int | None:
    """The window length the prune run that saved the folder ``model`` evaluated with (its own --seqlen when
    it evaluated nothing), so that `llmprune eval DIR` prints the numbers the run printed."""
    import json

    try:
        saved = json.loads((Path(model).expanduser() / integrity.REPORT_NAME).read_text())
    except (OSError, ValueError):
        return None
    seqlens = [row.get("seqlen") for row in (saved.get("perplexity") or {}).values()]
    seqlen = next((s for s in seqlens if isinstance(s, int)), None) or (saved.get("calibration") or {}).get("seqlen")
    return seqlen if isinstance(seqlen, int) else None


def run_eval(job: EvalJob) -> tuple[dict, dict, dict | None]:
    """The whole `llmprune eval`: (report, perplexities, zero-shot results or None); the report written if asked."""
    ddir = data.data_dir(job.data_dir)
    if job.zero_shot is not None:
        zeroshot.require_lm_eval()
        zeroshot.check_local_data(job.zero_shot.tasks, ddir)
    if job.report is not None:
        integrity.check_writable(job.report, "--report")
    t0 = time.perf_counter()
    lm, tok, info = loading.load_model(job.model, job.dtype, job.trust_remote_code, job.progress)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ppl = api.evaluate_perplexity(lm, tok, job.eval, job.device, ddir, job.progress) if job.eval.sets else {}
    zs = None
    if job.zero_shot is not None:
        lm.to(job.device)
        zs = zeroshot.evaluate_zero_shot(lm, tok, job.zero_shot, ddir, job.progress)
    payload = {
        "model": info, "device": str(job.device), "dtype": str(job.dtype).replace("torch.", ""),
        "perplexity": {k: {"perplexity": v.perplexity, "seqlen": v.seqlen, "windows": v.windows} for k, v in ppl.items()},
        "time": {"load_s": load_s, "eval_s": time.perf_counter() - t0},
        "peak_memory_bytes": devices.peak_memory_bytes(), "versions": report_mod.versions(),
    }
    if zs is not None:
        payload["zero_shot"] = {"harness": zs["harness"], "tasks": zs["tasks"], "mean": {"": zs["mean"]}}
    if job.report is not None:
        job.report.parent.mkdir(parents=True, exist_ok=True)
        report_mod.write_json(job.report, payload)
    return payload, ppl, zs
