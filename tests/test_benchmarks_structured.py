"""benchmarks/structured.py: its speed mode on a tiny random-weight shape on CPU (the 7B-shape mode's code path)."""

import importlib.util
import json

from .conftest import REPO


def load_script():
    spec = importlib.util.spec_from_file_location("structured_benchmark", REPO / "benchmarks" / "structured.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_speed_mode_on_a_tiny_shape(tmp_path):
    out = tmp_path / "speed.json"
    load_script().main(["speed", "--shape", "tiny", "--device", "cpu", "--remove", "0.3", "--prefill", "32",
                        "--prompt", "8", "--steps", "3", "--repeats", "2", "--tmp", str(tmp_path), "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["pruned"]["widths"] == {"intermediate_size": 192, "num_key_value_heads": 1, "num_hidden_layers": 4}
    assert result["pruned"]["settings"]["importance"] == "magnitude"
    for name in ("dense", "pruned"):
        t = result["timings"][name]
        assert len(t["prefill_s"]) == 2 and len(t["decode_s"]) == 2 and t["decode_tok_s"] > 0
    assert set(result["speedup"]) == {"prefill_tok_s", "decode_tok_s", "prefill_tok_cpu_s", "decode_tok_cpu_s"}
    assert len(result["timings"]["dense"]["prefill_cpu_s"]) == 2
    assert not any(p.is_dir() for p in tmp_path.iterdir())  # the saved folders are gone


def test_of_model_counts_the_whole_model(tmp_path):
    """--of model: the decoder gives the whole model's fraction (embeddings are never shrunk), so it loses more."""
    fractions = {}
    for of in ("decoder", "model"):
        out = tmp_path / f"{of}.json"
        load_script().main(["speed", "--shape", "tiny", "--device", "cpu", "--remove", "0.3", "--of", of,
                            "--prefill", "8", "--prompt", "4", "--steps", "1", "--repeats", "1", "--warmup", "0",
                            "--width-multiple", "1", "--tmp", str(tmp_path), "--out", str(out)])
        result = json.loads(out.read_text())
        assert result["protocol"]["of"] == of
        fractions[of] = (result["pruned"]["removed_fraction"], result["pruned"]["model_removed_fraction"])
    assert abs(fractions["decoder"][0] - 0.3) < 0.02  # within one KV group / channel's rounding of the target
    assert abs(fractions["model"][1] - 0.3) < 0.02
    assert fractions["model"][0] > fractions["decoder"][0] + 0.05


def test_blocks_on_a_shape_calibrate_on_random_tokens(tmp_path):
    """ShortGPT's block importance needs calibration; a --shape model has no tokenizer, so random tokens serve."""
    out = tmp_path / "blocks.json"
    load_script().main(["speed", "--shape", "tiny", "--device", "cpu", "--structure", "blocks", "--remove", "0.25",
                        "--nsamples", "2", "--seqlen", "16", "--prefill", "8", "--prompt", "4", "--steps", "1",
                        "--repeats", "1", "--warmup", "0", "--tmp", str(tmp_path), "--out", str(out)])
    assert json.loads(out.read_text())["pruned"]["widths"]["num_hidden_layers"] == 3


def test_prune_mode_times_each_row_on_the_same_widths(tmp_path):
    out = tmp_path / "prune.json"
    load_script().main(["prune", "--shape", "tiny", "--device", "cpu", "--remove", "0.3", "--nsamples", "4",
                        "--seqlen", "16", "--only", "flap+lsq", "obs+lsq", "wanda-sp+lsq-dense", "flap+lsq+adaptive", "--out", str(out)])
    result = json.loads(out.read_text())
    assert [r["label"] for r in result["rows"]] == ["flap+lsq", "obs+lsq", "wanda-sp+lsq-dense", "flap+lsq+adaptive"]
    assert [(r["settings"]["importance"], r["settings"]["restore"], r["settings"]["allocation"])
            for r in result["rows"]] == [("flap", "lsq", "uniform"), ("obs", "lsq", "uniform"),
                                         ("wanda-sp", "lsq-dense", "uniform"), ("flap", "lsq", "adaptive")]
    assert len({json.dumps(r["widths"]) for r in result["rows"]}) == 1 and all(r["prune_s"] > 0 for r in result["rows"])
    assert result["calibration"] == {"nsamples": 4, "seqlen": 16, "tokens": "random"}
    table = importlib.util.spec_from_file_location("render_tables", REPO / "benchmarks" / "render_tables.py")
    render = importlib.util.module_from_spec(table)
    table.loader.exec_module(render)
    text = render.structured_prune_time_table(out)
    assert "| obs+lsq |" in text and "| flap+lsq |" in text and "1.00x" in text
