# Two entry points (see README): `make demo` and `make test`.
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
export RAY_AUTH_MODE := disabled

.PHONY: install demo test test-fast clean

$(VPY):
	$(PY) -m venv $(VENV)

# torch first: on a CPU machine this takes the local CPU wheel; a machine that already has a CUDA
# torch keeps it (the project only asks for torch>=2.4).
install: $(VPY)
	@if $(VPY) -c "import torch" 2>/dev/null; then echo "torch present: $$($(VPY) -c 'import torch; print(torch.__version__)')"; \
	 else $(VPY) -m pip install -q torch==2.13.0; fi
	DS_BUILD_OPS=0 $(VPY) -m pip install -q -e ".[test]"

demo: install
	$(VENV)/bin/scope generate --prompt "a red circle moves right" --frames 48 --seed 0 \
	  --steps 30 --ar-step 2 --accel scope --out out/demo.mp4 --stats out/demo_stats.json

test: install
	.ci/services.sh install
	$(VPY) -m pytest -q tests

test-fast: install
	$(VPY) -m pytest -q tests/unit tests/parity

clean:
	rm -rf out .pytest_cache
