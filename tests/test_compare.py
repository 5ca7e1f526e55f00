"""`llmprune compare`'s per-layer plots: the x axis names blocks and Linear types, sparsity sits on a fixed 0-1 axis."""

import pytest

from llmprune import compare

pytest.importorskip("matplotlib")

NAMES = [f"model.layers.{b}.{part}" for b in range(12) for part in
         ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
          "mlp.up_proj", "mlp.down_proj")]


def test_layer_axis_by_hand():
    layers = [{"name": n} for n in ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
                                    "model.layers.1.self_attn.q_proj", "model.layers.10.mlp.up_proj", "lm_head")]
    kinds, ticks = compare.layer_axis(layers)
    assert kinds == ["q_proj", "down_proj", "q_proj", "up_proj", "lm_head"]
    assert ticks == [(0, "0"), (2, "1"), (3, "10"), (4, "lm_head")]


def test_sparsity_plot_has_a_fixed_axis_one_panel_per_run_and_block_ticks(tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(compare, "_save", lambda fig, path: figures.append(fig) or path)
    runs = [{"method": m, "pattern": "unstructured", "sparsity": 0.5000011,
             "layers": [{"name": n, "sparsity": 0.5 + (1e-6 if i % 7 == 3 else 0.0)} for i, n in enumerate(NAMES)]}
            for m in ("wanda", "magnitude")]
    plt = compare._pyplot()
    compare._layer_plot(plt, runs, "sparsity", "sparsity", tmp_path / "layer_sparsity.png")
    (fig,) = figures
    axes = fig.axes
    assert len(axes) == 2  # one panel per run: no line hides another
    for ax in axes:
        assert ax.get_ylim() == (0.0, 1.0)
        assert ax.yaxis.get_major_formatter().get_offset() == ""  # no "1e-6+5e-1"
        labels = [t.get_text() for t in ax.get_xticklabels()]
        assert labels == [str(b) for b in range(12)]  # block numbers, not a bare index 0-83
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert legend[:7] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        assert legend[7] == "overall 0.5000"
