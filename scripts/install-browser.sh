#!/usr/bin/env bash
# Installs what the web app's browser test needs: Debian's Chromium (Playwright drives the
# system browser; its own browser download is not used) and the playwright Python package.
# Without root or sudo and without Chromium, it says so and the browser test is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
CHROMIUM="${DDS_CHROMIUM:-/usr/bin/chromium}"
if [ ! -x "$CHROMIUM" ] && ! command -v chromium >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" != "0" ]; then
        if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo"; else
            echo "install-browser: no Chromium and no root: the browser test will be skipped" >&2
            SUDO="none"
        fi
    fi
    if [ "$SUDO" != "none" ] && command -v apt-get >/dev/null 2>&1; then
        $SUDO apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium
    fi
fi
# playwright must not replace the torch build already in the venv.
TORCH_BEFORE="$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
"$VENV/bin/python" -m pip install -q "playwright>=1.45"
TORCH_AFTER="$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
if [ "$TORCH_BEFORE" != "$TORCH_AFTER" ]; then
    echo "install-browser: installing playwright changed torch ($TORCH_BEFORE -> $TORCH_AFTER)" >&2
    exit 1
fi
