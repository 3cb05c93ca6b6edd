# Everything a newcomer needs: `make demo` and `make test` create .venv and install into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines pin the local CPU build of torch; GPU hosts: make TORCH_CONSTRAINTS= install-gpu
TORCH_CONSTRAINTS ?= constraints/cpu.txt
PIP_C := $(if $(TORCH_CONSTRAINTS),-c $(TORCH_CONSTRAINTS),)

.PHONY: install demo test lint proto bench clean

$(BIN)/.installed: pyproject.toml constraints/cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(PIP_C) -e '.[dev]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/splitserve demo

# pytest exits 5 when it collects no test; make fails on any non-zero exit, so that never passes.
test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .

proto: install
	$(BIN)/python -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. proto/splitserve/v1/*.proto
	# proto/ installs as the package splitserve_proto (see pyproject.toml)
	sed -i 's/from proto\.splitserve/from splitserve_proto.splitserve/; s/'"'"'proto\.splitserve/'"'"'splitserve_proto.splitserve/' proto/splitserve/v1/*_pb2*.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
