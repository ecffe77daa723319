# One venv, pinned versions (constraints.txt). `make demo` is the README's main job, `make test` its test command.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
DATA    ?= $(if $(wildcard ../shared/data/pets),../shared/data/pets,)
STORE   ?= stores/pets

.PHONY: install demo test lint bench clean

$(BIN)/mammals: pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	# --no-compile: pip would byte-compile every file of every package (plotly, ray, torch: 85 of 213 s here);
	# Python compiles the modules that are imported, once, on first use.
	$(BIN)/pip install -q --disable-pip-version-check --no-compile -c constraints.txt -e '.[dev,ray]'
	@touch $@

install: $(BIN)/mammals

demo: install
	$(BIN)/mammals index $(DATA) --store $(STORE)
	$(BIN)/mammals info $(STORE)

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: install
	$(BIN)/python -m benchmarks.bench_index
	$(BIN)/python -m benchmarks.bench_latents

clean:
	rm -rf $(VENV) stores
