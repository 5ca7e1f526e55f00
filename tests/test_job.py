"""A run as one typed job: flags parsed once, cross-field rules refused on construction, the command's defaults."""

import inspect

import pytest
import torch
import typer

from llmprune import UsageError
from llmprune.cli import app
from llmprune.job import PruneJob
from llmprune.layerwise import OWL
from llmprune.patterns import NM, Unstructured

FLAGS = dict(nsamples=4, seqlen=16, device="cpu", dtype="float32", batch_size=2, progress=False)


def test_job_from_flags_is_typed_and_parsed_once():
    job = PruneJob.from_flags(**{**FLAGS, "pattern": "2:4", "eval_tasks": "ptb,boolq", "refine": "dsnot",
                                 "dsnot_cycles": 7})
    assert job.pattern == NM(2, 4) and job.run.device == torch.device("cpu") and job.run.dtype == torch.float32
    assert job.eval.sets == ("wikitext2", "ptb") and job.eval.seqlen == 16 and job.zero_shot.tasks == ("boolq",)
    assert job.method.name.startswith("wanda") and job.method.cycles == 7 and job.needs_calibration
    job = PruneJob.from_flags(**{**FLAGS, "method": "magnitude", "eval_sets": "", "evaluates": False})
    assert job.pattern == Unstructured(0.5) and not job.needs_calibration and job.eval.sets == ()
    job = PruneJob.from_flags(**{**FLAGS, "method": "ria", "scope": "row", "layerwise": "owl", "owl_variant": "llmprune",
                                 "refine": "dsnot", "dsnot_variant": "LLMPrune"})
    assert job.pattern == Unstructured(0.5, "row") and job.layerwise == OWL(5.0, 0.08, "llmprune")
    assert job.method.variant == "llmprune"
    job = PruneJob.from_flags(**{**FLAGS, "layerwise": "owl", "refine": "dsnot"})
    assert job.layerwise.variant == "paper" and job.method.variant == "paper" and job.pattern.scope is None


@pytest.mark.parametrize("change, message", [
    ({"layerwise": "owl", "pattern": "2:4"}, "--layerwise works with unstructured sparsity only, not --pattern 2:4"),
    ({"permute": True}, "--permute only changes N:M masks; use it with --pattern N:M"),
    ({"layerwise": "owl", "owl_lambda": 0.6}, "--layerwise owl: --sparsity 0.5 +- --owl-lambda 0.6 leaves [0, 1)"),
    ({"stream_from_disk": True, "eval_sets": ""}, "--stream-from-disk writes the pruned model block by block: give --out DIR"),
    ({"batch_size": 0}, "--batch-size must be >= 1, got 0"),
    ({"scope": "row", "pattern": "4:8"}, "--scope applies to unstructured sparsity; drop --scope with --pattern 4:8"),
    ({"owl_variant": "paper"}, "--owl-variant sets OWL's mapping of outlier ratios: add --layerwise owl"),
    ({"dsnot_variant": "paper"}, "--dsnot-cycles, --dsnot-threshold and --dsnot-variant set DSnoT's refinement"),
])
def test_job_refuses_a_bad_combination_on_construction(change, message):
    with pytest.raises(UsageError) as err:
        PruneJob.from_flags(**{**FLAGS, **change})
    assert message in str(err.value)



def test_the_prune_command_passes_every_option_with_the_same_default():
    command = typer.main.get_command(app).commands["prune"]
    defaults = {p.name: p.default for p in command.params}
    signature = {n: p.default for n, p in inspect.signature(PruneJob.from_flags).parameters.items() if n != "evaluates"}
    assert set(defaults) == set(signature)
    assert {n: d for n, d in defaults.items() if d != signature[n]} == {}
