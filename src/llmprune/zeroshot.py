"""Zero-shot accuracy through lm-evaluation-harness, on the already loaded model object.

The tasks are lm-eval's own (same prompts, choices and metrics). With a local data directory
(``--data-dir`` / ``LLMPRUNE_DATA_DIR``) they read the files listed in ``LOCAL_FILES`` through the
task configs in ``lm_eval_tasks/`` (shipped with llmprune), which turn each file into the rows of the
Hugging Face dataset that lm-eval's task reads; without one, lm-eval's standard hub tasks are used.
lm-eval is imported only here, and only when a zero-shot task runs (``pip install llmprune[eval]``).
"""

from __future__ import annotations

import bz2
import contextlib
import json
import logging
import math
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import UsageError

TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa", "piqa")
PAPER_TASKS = TASKS[:7]  # the seven tasks whose mean accuracy the Wanda paper reports
TASK_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
INSTALL_HINT = "pip install 'llmprune[eval]'"

# task -> files it reads under the data directory
LOCAL_FILES = {
    "boolq": ("boolq/val.jsonl",),
    "rte": ("rte/val.jsonl",),
    "hellaswag": ("hellaswag/hellaswag_val_full.txt.bz2",),
    "winogrande": ("winogrande/winogrande_xl_dev.llmfoundry.jsonl", "winogrande/dev-labels.lst"),
    "arc_easy": ("arc_easy/ARC-Easy-Test.jsonl",),
    "arc_challenge": ("arc_challenge/ARC-Challenge-Test.jsonl",),
    "openbookqa": ("openbookqa/openbook_qa_test.llmfoundry.jsonl",),
    "piqa": ("piqa/valid.jsonl", "piqa/valid-labels.lst"),
}
SPLIT = {"arc_easy": "test", "arc_challenge": "test", "openbookqa": "test"}  # the others: validation


@dataclass(frozen=True)
class ZeroShotSettings:
    """Which lm-eval tasks to run (0-shot), on how many examples each, with what batch size."""

    tasks: tuple[str, ...] = PAPER_TASKS
    limit: int | None = None
    """First N examples of each task (None: all)."""
    batch_size: int | None = None
    """Requests per forward pass; None: 1 on a CPU (padding a batch costs more than it saves there), 16 on a GPU."""

    def __post_init__(self) -> None:
        for name in self.tasks:
            if name not in TASKS:
                raise UsageError(f"--tasks: unknown task {name!r}; choose from {', '.join(TASKS)} "
                                 "(perplexity sets: wikitext2, ptb, c4)")
        if self.limit is not None and self.limit < 1:
            raise UsageError(f"--limit must be >= 1, got {self.limit}")
        if self.batch_size is not None and self.batch_size < 1:
            raise UsageError(f"--eval-batch-size must be >= 1, got {self.batch_size}")


@contextlib.contextmanager
def _quiet_version_stamp():
    """lm-eval stamps its results with ``git describe`` run in the current folder; outside a git checkout git
    prints ``fatal: not a git repository`` for every task. The same stamp, with git's stderr discarded."""
    import lm_eval.evaluator as evaluator

    original = getattr(evaluator, "get_git_commit_hash", None)
    if original is None:  # another lm-eval layout: leave it alone
        yield
        return

    def quiet() -> str | None:
        try:
            out = subprocess.check_output(["git", "describe", "--always"], stderr=subprocess.DEVNULL)
        except (OSError, subprocess.CalledProcessError):
            return None
        return out.strip().decode()

    evaluator.get_git_commit_hash = quiet
    try:
        yield
    finally:
        evaluator.get_git_commit_hash = original


def split_task_list(text: str | None, flag: str = "--tasks") -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A comma list of names -> (perplexity sets, zero-shot tasks), each in the order given; an unknown
    name is an error naming ``flag``, the option the list came from."""
    from .data import EVAL_SETS

    names = [s.strip().lower() for s in (text or "").split(",") if s.strip()]
    ppl = tuple(dict.fromkeys(n for n in names if n in EVAL_SETS))
    zs = tuple(dict.fromkeys(n for n in names if n not in EVAL_SETS))
    try:
        ZeroShotSettings(zs)  # unknown names fail here, before any work
    except UsageError as exc:
        raise UsageError(str(exc).replace("--tasks:", f"{flag}:", 1)) from None
    return ppl, zs


def local_paths(task: str, ddir: Path, flag: str = "--data-dir") -> tuple[Path, ...]:
    """The files a task reads under the data directory; a missing one is a UsageError naming it."""
    paths = tuple(ddir / rel for rel in LOCAL_FILES[task])
    for path in paths:
        if not path.is_file():
            raise UsageError(
                f"zero-shot task {task}: expected the file {path} ({flag} / LLMPRUNE_DATA_DIR is {ddir}); "
                f"put it there, point {flag} at a folder that has {LOCAL_FILES[task][0]}, "
                "or unset both to use the Hugging Face hub"
            )
    return paths


def _jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise UsageError(f"{path}: line {lineno} is not valid JSON ({exc.msg})") from None
    return rows


def _labels(path: Path, count: int) -> list[int]:
    labels = [int(x) for x in path.read_text().split()]
    if len(labels) != count:
        raise UsageError(f"{path}: {len(labels)} labels for {count} examples; the two files must come from one release")
    return labels


def read_local(task: str, ddir: Path) -> list[dict]:
    """The rows of the task's Hugging Face dataset (the fields lm-eval's task reads), from local files."""
    paths = local_paths(task, ddir)
    if task == "boolq":  # SuperGLUE jsonl; this copy stores label as the string "true"/"false"
        return [{"question": r["question"], "passage": r["passage"], "idx": r["idx"],
                 "label": int(str(r["label"]).lower() == "true")} for r in _jsonl(paths[0])]
    if task == "rte":  # SuperGLUE field names -> GLUE's (0 = entailment)
        return [{"sentence1": r["premise"], "sentence2": r["hypothesis"], "idx": r["idx"],
                 "label": 0 if r["label"] == "entailment" else 1} for r in _jsonl(paths[0])]
    if task == "hellaswag":  # 6 lines per example: context, label, four endings
        with bz2.open(paths[0], "rt", encoding="utf-8") as fh:
            lines = fh.read().split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        if len(lines) % 6:
            raise UsageError(f"{paths[0]}: {len(lines)} lines, not a multiple of 6 (context, label, 4 endings)")
        return [{"ctx": lines[i], "label": lines[i + 1].strip(), "endings": lines[i + 2: i + 6]}
                for i in range(0, len(lines), 6)]
    if task == "winogrande":
        rows = _jsonl(paths[0])
        answers = _labels(paths[1], len(rows))
        for i, (row, answer) in enumerate(zip(rows, answers)):
            if row["gold"] + 1 != answer:
                raise UsageError(f"{paths[0]}: example {i} has gold {row['gold']} but {paths[1]} says option {answer}")
        return [{"context_options": r["context_options"], "continuation": r["continuation"],
                 "answer": str(r["gold"] + 1)} for r in rows]
    if task in ("arc_easy", "arc_challenge"):  # the original ARC jsonl -> allenai/ai2_arc rows
        return [{"id": r["id"], "question": r["question"]["stem"],
                 "choices": {"text": [c["text"] for c in r["question"]["choices"]],
                             "label": [c["label"] for c in r["question"]["choices"]]},
                 "answerKey": r["answerKey"]} for r in _jsonl(paths[0])]
    if task == "openbookqa":  # llm-foundry's conversion: query, 4 choices in A-D order, gold index
        return [{"question_stem": r["query"], "choices": {"text": list(r["choices"]), "label": list("ABCD")},
                 "answerKey": "ABCD"[r["gold"]]} for r in _jsonl(paths[0])]
    if task == "piqa":
        rows = _jsonl(paths[0])
        return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": label}
                for r, label in zip(rows, _labels(paths[1], len(rows)))]
    raise KeyError(task)


def require_lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise UsageError(f"zero-shot tasks run through lm-evaluation-harness, which is not installed; {INSTALL_HINT}") from None
    return lm_eval


def harness_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def task_manager(ddir: Path | None):
    """lm-eval's TaskManager: llmprune's local task configs with a data directory, else lm-eval's own."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    if ddir is None:
        return TaskManager()
    # the local tasks never touch the hub; make sure nothing else does either
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return TaskManager(include_path=str(TASK_DIR), include_defaults=False, metadata={"data_dir": str(ddir)})


def check_local_data(tasks, ddir: Path | None, flag: str = "--data-dir") -> None:
    """Fail before any work if a task's local file is missing."""
    if ddir is not None:
        for task in tasks:
            local_paths(task, ddir, flag)


def _clean(value):
    if not isinstance(value, (int, float)) or math.isnan(value):  # absent, or lm-eval's "N/A"
        return None
    return float(value)


def mean_scores(tasks: dict) -> dict:
    """Mean acc over the tasks, and mean of acc_norm where the task has it (acc where it has not)."""
    if not tasks:
        return {"acc": None, "acc_norm_or_acc": None, "tasks": 0}
    accs = [t["acc"] for t in tasks.values()]
    norms = [t["acc_norm"] if t.get("acc_norm") is not None else t["acc"] for t in tasks.values()]
    return {"acc": sum(accs) / len(accs), "acc_norm_or_acc": sum(norms) / len(norms), "tasks": len(accs)}


def evaluate_zero_shot(model, tokenizer, settings: ZeroShotSettings, data_dir=None, progress: bool = True,
                       label: str = "", manager=None) -> dict:
    """Run each task 0-shot with lm-eval on ``model`` as it is (its device, its dtype; no copy, no reload).

    Returns ``{"tasks": {name: {acc, acc_stderr, acc_norm, acc_norm_stderr, samples, time_s, version, source}},
    "mean": {...}, "harness": {...}}``.
    """
    from . import data as data_mod

    ddir = data_mod.data_dir(data_dir)
    check_local_data(settings.tasks, ddir)
    require_lm_eval()
    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    manager = manager or task_manager(ddir)
    was_training = model.training
    model.eval()
    batch_size = settings.batch_size or (1 if model.device.type == "cpu" else 16)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = {}
    for task in settings.tasks:
        if progress:
            from tqdm.auto import tqdm

            tqdm.write(f"{label} zero-shot {task}".strip())
        t0 = time.perf_counter()
        try:
            (task_obj,) = manager.load([task])["tasks"].values()
        except Exception as exc:  # the hub dataset could not be had (offline, no access): say what to do
            if ddir is not None:
                raise
            raise UsageError(f"zero-shot task {task}: lm-eval could not load its hub dataset ({type(exc).__name__}: "
                             f"{str(exc)[:200]}); with no network, pass --data-dir (or set LLMPRUNE_DATA_DIR) "
                             f"to a folder holding {LOCAL_FILES[task][0]}") from None
        with _quiet_version_stamp():
            res = lm_eval.simple_evaluate(model=lm, tasks=[task_obj], num_fewshot=0, limit=settings.limit,
                                          task_manager=manager, log_samples=False, bootstrap_iters=1000,
                                          verbosity="ERROR")
        elapsed = time.perf_counter() - t0
        metrics = res["results"][task]
        source = ("local:" + ",".join(LOCAL_FILES[task])) if ddir is not None else \
            f"hub:{res['configs'][task].get('dataset_path')}"
        out[task] = {
            "acc": _clean(metrics.get("acc,none")),
            "acc_stderr": _clean(metrics.get("acc_stderr,none")),
            "acc_norm": _clean(metrics.get("acc_norm,none")),
            "acc_norm_stderr": _clean(metrics.get("acc_norm_stderr,none")),
            "samples": int(res["n-samples"][task]["effective"]),
            "time_s": elapsed,
            "version": res["versions"][task],
            "source": source,
        }
    model.train(was_training)
    return {"tasks": out, "mean": mean_scores(out),
            "harness": {"lm_eval": harness_version(), "num_fewshot": 0, "limit": settings.limit,
                        "batch_size": batch_size}}
