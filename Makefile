PY ?= python3

.PHONY: install test demo bench

install:
	bash setup.sh --dev

test:
	$(PY) -m pytest -q tests

demo:
	$(PY) main_finetune_lora.py
