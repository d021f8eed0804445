# rulewright: `make demo` sets everything up and runs the engine end to end; `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# Torch first and pinned: the CPU build lies on this disk; a plain requirement would pull a CUDA build.
TORCH_SPEC ?= torch==2.13.0
export RULEWRIGHT_CACHE_DIR ?= $(CURDIR)/.cache/rulewright

.PHONY: demo test bench venv servers clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	touch $@

venv: $(VENV)/.installed  ## create .venv with torch and the project

demo: venv  ## import the faces model and write an album of samples to out/album.png
	$(PY) -m rulewright.service album --model faces --seeds 0-31 --out out/album.png

# The registry tests start a real redis-server (moto_server comes with the test extras).
servers:  ## install redis-server from the system's packages if it is missing
	command -v redis-server >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server)

test: venv servers  ## the whole test suite
	$(PY) -m pytest -q

bench: venv  ## engine throughput: images/s and statistics FLOP rate vs torch.mm
	$(PY) -m benchmarks.engine

clean:
	rm -rf $(VENV) out .pytest_cache
