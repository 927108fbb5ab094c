# The two commands a newcomer needs: `make serve` and `make test`.
# Both create .venv and install everything on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch is installed on its own, pinned, so pip never reaches for a multi-GB CUDA build.
TORCH := torch==2.13.0
# The last released contract: `make breaking` (part of `make lint`) checks proto/ stays compatible with it.
# Move it forward when a release is cut.
RELEASE := a8a4cd0

.PHONY: serve test lint breaking typecheck package unit unit-busy proto bench demo clean

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

proto: $(STAMP)
	$(BIN)/python tools/gen_proto.py

evalstream/v1/service_pb2.py: $(STAMP) $(wildcard proto/evalstream/v1/*.proto)
	$(BIN)/python tools/gen_proto.py

serve: evalstream/v1/service_pb2.py
	$(BIN)/evalstream serve

demo: evalstream/v1/service_pb2.py
	$(BIN)/evalstream demo

lint: evalstream/v1/service_pb2.py
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	cd proto && ../$(BIN)/buf lint
	$(MAKE) breaking

# Old clients and servers must keep working with new ones: no field renumbered, retyped or removed
# since the release (buf's FILE rules). Needs the release commit in the clone's history. The
# release's proto/ is exported with git archive rather than named as buf's ".git#ref=" input: buf
# clones that input 50 commits deep, so it stops finding the release once main moves further on.
breaking: $(STAMP)
	@git cat-file -e $(RELEASE)^{commit} 2>/dev/null || { echo "make breaking: commit $(RELEASE) (the last release) is not in this clone; fetch full history (git fetch --unshallow)"; exit 1; }
	rm -rf build/release && mkdir -p build/release
	git archive $(RELEASE) proto | tar -x -C build/release
	cd proto && ../$(BIN)/buf breaking --against ../build/release/proto

typecheck: evalstream/v1/service_pb2.py
	$(BIN)/python tools/typecheck.py

package: evalstream/v1/service_pb2.py
	PY=$(BIN)/python tools/check_package.sh

unit: evalstream/v1/service_pb2.py
	tools/ensure_prometheus.sh
	tools/ensure_postgres.sh
	$(BIN)/python -m pytest -q -rs

# The suite while other processes keep every core busy half of each 100 ms (as on a shared CI
# runner): tests that assert bounds must hold there too. BUSY is the shared/ folder's tool beside
# the checkout (../shared/tools/busy); point it elsewhere with `make unit-busy BUSY=/path/to/busy`.
BUSY ?= ../shared/tools/busy

unit-busy: evalstream/v1/service_pb2.py
	@test -x "$(BUSY)" || { echo "make unit-busy: $(BUSY) not found or not executable; it is the CPU hog in the shared/ folder beside the checkout (set BUSY=/path/to/busy)" >&2; exit 2; }
	tools/ensure_prometheus.sh
	tools/ensure_postgres.sh
	$(BUSY) -- $(BIN)/python -m pytest -q -rs

test: lint typecheck package unit

bench: evalstream/v1/service_pb2.py
	$(BIN)/python -m bench

clean:
	rm -rf $(VENV) evalstream/v1 build *.egg-info
