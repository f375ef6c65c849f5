# make run  : set up everything missing, run the workflow on the dummy data, print the summary
# make test : set up everything missing, run the whole test suite (CI runs exactly this)

PYTHON ?= python3
DRIVER := .venvs/driver
SNAKEMAKE := $(DRIVER)/bin/snakemake
JOBS ?= 2
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: run test envs driver lint format clean browser locks gpu-wheels gpu-check

driver: $(DRIVER)/.built

$(DRIVER)/.built: envs/driver.txt
	rm -rf $(DRIVER)
	$(PYTHON) -m venv $(DRIVER)
	$(DRIVER)/bin/pip install --no-input --no-deps --extra-index-url $(TORCH_CPU_INDEX) torch==2.13.0+cpu
	$(DRIVER)/bin/pip install --no-input -r envs/driver.txt
	touch $@

# The framework envs are workflow jobs (rules/envs.smk), so a changed pin rebuilds just that env.
envs: driver
	$(SNAKEMAKE) -j$(JOBS) envs

# Full locks (envs/locks/<env>-$(VARIANT).txt: every package pinned): each env file's pip list
# resolved afresh into a throw-away venv (never .venvs/, never an existing lock), then frozen.
# The venv rules build from these locks; delete one to build that env from its env file again.
# `make locks ENVS=align` renews one env's lock only.
VARIANT ?= cpu
ENVS ?= align nemo nest
locks: driver
	set -e; for env in $(ENVS); do \
		tmp=$$(mktemp -d); \
		$(DRIVER)/bin/python scripts/build_venv.py envs/$$env.yaml $$tmp/$$env --variant $(VARIANT); \
		$(DRIVER)/bin/python scripts/build_venv.py --freeze $$tmp/$$env envs/locks/$$env-$(VARIANT).txt \
			--from-spec envs/$$env.yaml; \
		rm -rf $$tmp; \
	done

# GPU check (scripts/gpu_check.py): `make gpu-wheels` (with network) fills .gpu-wheels/ with the
# py312 manylinux wheels the GPU machine's python lacks; `make gpu-check` on that machine.
GPU_PYTHON ?= python3
gpu-wheels:
	$(PYTHON) scripts/gpu_check.py --download-wheels .gpu-wheels

gpu-check:
	$(GPU_PYTHON) scripts/gpu_check.py

run: envs
	$(SNAKEMAKE) -j$(JOBS)
	@cat results/summary.md

# The report test renders the page in headless Chromium (Debian's package).
browser:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)

test: envs browser
	$(DRIVER)/bin/python -m pytest

lint: driver
	$(DRIVER)/bin/ruff check src scripts tests benchmarks
	$(DRIVER)/bin/ruff format --check src scripts tests benchmarks
	$(SNAKEMAKE) --lint
	$(DRIVER)/bin/snakefmt --check Snakefile rules

format: driver
	$(DRIVER)/bin/ruff format src scripts tests benchmarks
	$(DRIVER)/bin/snakefmt Snakefile rules

clean:
	rm -rf results .snakemake
