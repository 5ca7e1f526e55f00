"""Local-file datasets for llmprune's lm-eval task configs (loaded by lm-eval through ``!function``).

Each ``custom_dataset`` function gets the TaskManager metadata (``data_dir``) and returns a
``datasets.DatasetDict`` with the rows of the Hugging Face dataset that lm-eval's own task reads.
"""

from pathlib import Path

import datasets

from llmprune.zeroshot import SPLIT, read_local


def _load(task, data_dir=None, **_):
    if not data_dir:
        raise ValueError(f"{task}: llmprune's local task needs metadata data_dir")
    return datasets.DatasetDict({SPLIT.get(task, "validation"): datasets.Dataset.from_list(read_local(task, Path(data_dir)))})


def boolq(**kw):
    return _load("boolq", **kw)


def rte(**kw):
    return _load("rte", **kw)


def hellaswag(**kw):
    # lm-eval's own preprocessing, applied to what the local file keeps. The file's context is the
    # original `ctx`, i.e. ctx_a + " " + ctx_b without capitalising ctx_b (lm-eval capitalises it).
    from lm_eval.tasks.hellaswag.utils import preprocess

    def doc(row):
        return {"query": preprocess(row["ctx"]), "choices": [preprocess(e) for e in row["endings"]]}

    return _load("hellaswag", **kw).map(doc)


def winogrande(**kw):
    return _load("winogrande", **kw)


def winogrande_doc_to_text(doc):  # the index of the right context, as lm-eval's winogrande
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_doc_to_target(doc):  # the text after the blank
    return doc["continuation"].strip()


def winogrande_doc_to_choice(doc):  # the sentence up to the blank, with each option filled in
    return list(doc["context_options"])


def arc_easy(**kw):
    return _load("arc_easy", **kw)


def arc_challenge(**kw):
    return _load("arc_challenge", **kw)


def openbookqa(**kw):
    return _load("openbookqa", **kw)


def piqa(**kw):
    return _load("piqa", **kw)
