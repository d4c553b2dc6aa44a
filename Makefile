# Stage names are the commands: `make frames flow shards`, then `make demo` for the whole chain.
# Variables pass through: make frames VIDEOS=/data/UCF-101 DATA=/data/ucf DATASET=ucf101 SPLITS=... JOBS=16

VENV       ?= .venv
PY         := $(VENV)/bin/python
PIPELINE   := $(VENV)/bin/pipeline
# CPU-only machines get this exact build (the CPU wheel); a GPU user installs their CUDA torch
# into $(VENV) first (it is then kept), or passes TORCH_SPEC. See README "Installing".
TORCH_SPEC ?= torch==2.13.0

DEMO_VIDEOS := data/demo_videos
VIDEOS     ?= $(DEMO_VIDEOS)
DATA       ?= data/demo
DATASET    ?= ucf101
SPLITS     ?= $(if $(filter $(VIDEOS),$(DEMO_VIDEOS)),$(DEMO_VIDEOS)/splits,)
JOBS       ?= 2
BACKEND    ?= auto
FLOW_BACKEND ?= auto
SCHEDULER  ?=
PYTEST_ARGS ?=

SPLITS_OPT := $(if $(SPLITS),--splits $(SPLITS),)
# SCHEDULER=tcp://host:8786 runs the videos on a Dask cluster (README "Running on a cluster").
SCHED_OPT  := $(if $(SCHEDULER),--scheduler $(SCHEDULER),)

.PHONY: venv test demo demo-videos frames flow shards verify status features train clean-demo

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,cluster]"
	touch $@

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo-videos: venv
	@if [ "$(VIDEOS)" = "$(DEMO_VIDEOS)" ]; then $(PIPELINE) demo-data --out $(DEMO_VIDEOS); fi

frames: venv demo-videos
	$(PIPELINE) frames --videos $(VIDEOS) --data $(DATA) --dataset $(DATASET) $(SPLITS_OPT) --jobs $(JOBS) $(SCHED_OPT)

flow: venv
	$(PIPELINE) flow --data $(DATA) --backend $(FLOW_BACKEND) --jobs $(JOBS) $(SCHED_OPT)

shards: venv
	$(PIPELINE) shards --data $(DATA) --jobs $(JOBS) $(SCHED_OPT)

verify: venv
	$(PIPELINE) verify --data $(DATA)

status: venv
	$(PIPELINE) status --data $(DATA)

demo: venv
	$(PIPELINE) demo --data $(DATA) --videos $(DEMO_VIDEOS) --jobs $(JOBS)

# Training with the papers' defaults on split SPLIT; TRAIN_OPTS passes options (e.g.
# --workers 8 --pretrained k400.pth); every run resumes from its checkpoint.
SPLIT      ?= 1
TRAIN_OPTS ?=
TRAIN_ARGS := --data $(DATA) --split $(SPLIT) $(TRAIN_OPTS)

features: venv
	$(PIPELINE) teacher-features --data $(DATA) --teacher teacher_split$(SPLIT)

train: venv
	$(PIPELINE) train-teacher $(TRAIN_ARGS)
	$(PIPELINE) teacher-features --data $(DATA) --teacher teacher_split$(SPLIT)
	$(PIPELINE) distill $(TRAIN_ARGS)
	$(PIPELINE) train-rgb $(TRAIN_ARGS)
	$(PIPELINE) train-two-stream $(TRAIN_ARGS)
	$(PIPELINE) evaluate --data $(DATA)

clean-demo:
	rm -rf $(DEMO_VIDEOS) data/demo
