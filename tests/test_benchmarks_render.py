"""benchmarks/render_tables.py: rows the fixed order does not name still render; carried GGUFs name their alias."""

import importlib.util
import json

from .conftest import REPO


def load_script():
    spec = importlib.util.spec_from_file_location("render_tables", REPO / "benchmarks" / "render_tables.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def zero_shot_row(method, pattern, acc, ppl):
    return {"method": method, "pattern": pattern, "perplexity": ppl, "mean_acc": acc, "threads": 2,
            "zero_shot": {"rte": {"acc": acc, "time_s": 1.0}}}


def test_zero_shot_table_renders_structured_rows_after_the_fixed_order(tmp_path):
    result = {"model": {"spec": "smollm2-135m"}, "device": "cpu", "dtype": "float32", "machine": {"threads": 2},
              "versions": {"lm_eval": "0.4.13"},
              "protocol": {"zero_shot": {"tasks": ["rte"], "limit": 20, "num_fewshot": 0},
                           "calibration": {"nsamples": 32, "seqlen": 512, "seed": 0},
                           "perplexity": {"windows": 16, "seqlen": 512}},
              "rows": [zero_shot_row("shortgpt", "blocks 20%", 0.55, 96.59), zero_shot_row("dense", "-", 0.65, 36.63),
                       zero_shot_row("flap+lsq", "mlp,heads 20%", 0.5, 90.66)]}
    path = tmp_path / "zs.json"
    path.write_text(json.dumps(result))
    lines = load_script().zero_shot_table(path).splitlines()
    rows = [line for line in lines if line.count("|") == 6 and not line.startswith(("| method", "|---"))]
    names = [row.split(" | ")[0][2:] for row in rows]
    assert names[0] == "dense" and names[-2:] == ["shortgpt", "flap+lsq"]  # the JSON's order after the fixed ones
    assert "| shortgpt | blocks 20% | 55 | 55.0 | 96.59 |" in rows
    assert sum("not run" in row for row in rows) == 6  # the six fixed sparse rows absent from this file


def test_model_name_of_a_carried_gguf_and_of_a_plain_spec():
    render = load_script()
    sha = "a5fd3b62" + "0" * 56
    carried = {"model": {"spec": "/tmp/g.gguf", "path": "/tmp/g.gguf", "alias": "gemma3-270m", "sha256": sha}}
    assert render.model_name(carried) == "gemma3-270m (sha256 a5fd3b62... at /tmp/g.gguf)"
    assert render.model_name({"model": {"spec": "smollm2-135m"}}) == "smollm2-135m"
    assert render.where({"machine": {"gpu": "NVIDIA H200", "threads": 16}}) == "NVIDIA H200"
    assert render.where({"machine": {"threads": 2}}) == "2 threads"


def test_structured_table_shows_the_gap_closed_and_adaptive_widths(tmp_path):
    widths = {"intermediate_size": 96, "num_key_value_heads": 1, "num_hidden_layers": 2}
    row = lambda label, ppl, **kw: {"label": label, "structure": "mlp", "remove": 0.2, "perplexity": ppl,
                                    "removed_fraction": 0.2, "widths": widths, **kw}
    result = {"model": {"spec": "gemma3-270m"}, "device": "cpu", "dtype": "float32", "machine": {"threads": 2},
              "protocol": {"calibration": {"nsamples": 4, "seqlen": 16, "seed": 0},
                           "eval": {"seqlen": 16, "windows": 2}, "structure": "mlp", "width_multiple": 32},
              "rows": [{"label": "dense", "perplexity": 10.0}, row("wanda-sp+none", 30.0),
                       row("flap+lsq+adaptive", 22.0, intermediate_sizes=[64, 128])]}
    path = tmp_path / "st.json"
    path.write_text(json.dumps(result))
    text = load_script().structured_table(path)
    assert "| flap+lsq+adaptive | 22.0 (+40%) [64-128] |" in text  # (30 - 22) / (30 - 10)
    assert "per block in the +adaptive rows" in text
