#!/usr/bin/env bash
# Sets up a fresh Debian/Ubuntu machine: system packages (speech synthesizers for the embedded corpus, the
# text source), a virtualenv in .venv, and the package with its test/eval extras. Idempotent: a second run
# only checks. Usage: bash launch/setup.sh   (env: VENV=.venv PYTHON=python3 EXTRAS=dev)
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(flite espeak-ng sox fortunes fortunes-min)
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-dev}

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "[setup] installing system packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.e2etts-installed"
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ]; then
  echo "[setup] installing e2etts_jax[$EXTRAS] into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
  touch "$stamp"
fi
versions=$("$VENV/bin/python" -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__)')
echo "[setup] ready: $versions"
