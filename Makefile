# Two commands do all the set-up on a fresh machine:
#   make demo   the main job: the tiny end-to-end run on CPU
#   make test   the whole test suite (starts the local Slurm cluster the tests use)
# Both create .venv and install everything when it is missing, and are quick when it is there.

PY      ?= python3.11
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test test-fast install slurm-up slurm-down clean

install: $(STAMP)

$(STAMP): pyproject.toml ci/requirements.txt
	@command -v $(PY) >/dev/null || { echo "need $(PY) (Python 3.11) on PATH"; exit 1; }
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip wheel setuptools
	$(VPY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(VPY) -m pip install -q -r ci/requirements.txt
	$(VPY) -m pip install -q --no-build-isolation deepspeed==0.19.8
	$(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	# build DeepSpeed's CPU ops once per machine, with the venv's ninja (ci/build_deepspeed_ops.py says why)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VPY) ci/build_deepspeed_ops.py
	touch $(STAMP)

demo: $(STAMP)
	$(VPY) -m pretrain.demo --out demo_out

slurm-up:
	bash cluster/local_cluster.sh start

slurm-down:
	bash cluster/local_cluster.sh stop

test: $(STAMP) slurm-up
	$(VPY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(VPY) -m pytest -m "not slow and not slurm" $(PYTEST_ARGS)

clean:
	rm -rf demo_out runs .pytest_cache
