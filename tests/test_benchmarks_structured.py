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
