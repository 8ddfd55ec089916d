# Entry points: `make lab` (the whole PW-11 lab → HTML report), `make test` (every test, slow ones too; CI)
# and `make test-fast` (plain pytest: slow tests skipped).
# Each creates .venv and installs everything it needs; torch 2.13.0 (CPU) goes in first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: lab test test-fast bench install clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[test,onnx,serve]'
	$(BIN)/pip install -q --disable-pip-version-check --no-deps captum==0.9.0
	$(BIN)/pip install -q --disable-pip-version-check --no-deps torchcam==0.5.0
	touch $(STAMP)

install: $(STAMP)

lab: $(STAMP)
	$(BIN)/convlens lab --out convlens-out/lab

test: $(STAMP)
	@command -v chromium >/dev/null 2>&1 || (apt-get install -y -q chromium >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1)) || echo "chromium not installed: browser test will be skipped"
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "" tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

bench: $(STAMP)
	test -f convlens-out/lab/train/model.pt || $(BIN)/convlens lab --out convlens-out/lab --quiet
	$(BIN)/python bench/train.py
	$(BIN)/python bench/stats.py --model convlens-out/lab/train
	$(BIN)/python bench/actmax.py --model convlens-out/lab/train
	$(BIN)/python bench/attribution.py
	$(BIN)/python bench/evaluate.py --model convlens-out/lab/train
	$(BIN)/python bench/onnx_import.py
	$(BIN)/python bench/serve.py --model convlens-out/lab/train

clean:
	rm -rf $(VENV) convlens-out
