PY ?= python3

.PHONY: install test demo bench

install:
	bash setup.sh --dev

test:
	$(PY) -m pytest -q -n 2 --dist loadgroup tests

demo:
	$(PY) main_finetune_lora.py

# A quick CPU benchmark (a few minutes): LoRA training step vs its peers; bench/README.md has the rest.
bench:
	$(PY) bench/bench_model.py --quick --device cpu
