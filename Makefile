# One entry point for setup, jobs, tests and benchmarks. `make demo` and `make test` work on a fresh machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
OUT ?=
JOB ?= jobs/demo.yaml
CSV ?=
SET ?=
RAY_ADDRESS ?= http://127.0.0.1:8265
# job targets take OUT= (output root), CSV= (the first source's path: a CSV, Parquet, folder or URI) and SET=
# ("key=value key=value": any job key, e.g. SET="decode.fps=8 ray.num_cpus=4")
JOB_ARGS = $(if $(OUT),--out $(OUT)) $(if $(CSV),--set sources.0.path=$(CSV)) $(foreach s,$(SET),--set $(s))
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: install demo images webvid panda70m objaverse run dry-run submit status verify compact lint test test-reliability \
        bench-tokenizer bench-pipeline bench-3d bench-scale bench-reader train-tiny clean

# Without a GPU, pin the CPU build of torch so pip does not pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch numpy; \
	else $(PY) -m pip install -q torch==2.13.0 numpy; fi
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m pipeline demo --out $(or $(OUT),out/demo)

images webvid panda70m objaverse: install
	$(PY) -m pipeline run jobs/$@.yaml $(JOB_ARGS)

run: install
	$(PY) -m pipeline run $(JOB) $(JOB_ARGS)

dry-run: install
	$(PY) -m pipeline run $(JOB) --dry-run $(JOB_ARGS)

# Submit a job file to a running Ray cluster (ray job submit): the resolved job, this repository as working dir.
submit: install
	$(PY) -m pipeline submit $(JOB) --address $(RAY_ADDRESS) $(JOB_ARGS)

status verify compact: install
	$(PY) -m pipeline $@ $(or $(OUT),out)

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: install lint
	$(PY) -m pytest -q

test-reliability: install
	$(PY) -m pytest -q tests/reliability -m 'not gpu'

bench-tokenizer: install
	$(PY) benchmarks/bench_tokenizer.py --out benchmarks/results/tokenizer.json

bench-pipeline: install
	$(PY) benchmarks/bench_pipeline.py --out benchmarks/results/pipeline.json

bench-3d: install
	$(PY) benchmarks/bench_3d.py --out benchmarks/results/3d.json

# The released AToken checkpoints into checkpoints/ (resumable; ARGS=--dry-run to see what would be fetched)
checkpoints: install
	$(PY) -m atoken.download --dest checkpoints $(ARGS)

bench-scale: install
	$(PY) benchmarks/bench_scale.py --out benchmarks/results/scale.json

bench-reader: install
	$(PY) benchmarks/bench_reader.py --out benchmarks/results/reader.json

# step 1 from scratch (8 + 4 min) into runs/tiny-base, step 2 fine-tunes it (~4 + 4 min on one H200) into atoken/weights
train-tiny: install
	$(PY) -m atoken.train --config atoken/configs/tiny-train.yaml
	$(PY) -m atoken.train --config atoken/configs/tiny-finetune.yaml
	$(PY) -m atoken.train --config atoken/configs/tiny-motion.yaml

clean:
	rm -rf $(or $(OUT),out) runs
