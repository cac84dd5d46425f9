# Each top-level command sets itself up: it creates .venv and installs fedsync with its
# development dependencies when pyproject.toml is newer than the last install.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint proto bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedsync simulate --devices 20 --rounds 16 --seed 0 --local-training litert --data-dir .fedsync/demo --report .fedsync/demo/report.json

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check fedsync coordinator client tests bench

proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=. --pyi_out=. --grpc_python_out=. proto/fedsync/v1/sync.proto

bench: $(STAMP)
	$(BIN)/python bench/aggregate.py

clean:
	rm -rf $(VENV) .fedsync .pytest_cache .ruff_cache
