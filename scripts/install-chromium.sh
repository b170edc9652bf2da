#!/usr/bin/env bash
# Headless Chromium for the HTML-report browser tests (tests/browser.py): Debian's
# `chromium` package. Installs it when it is missing and this runs as root with apt-get;
# otherwise says why not and exits 0 (the browser tests then skip, printing the reason).
set -uo pipefail

if command -v chromium >/dev/null 2>&1; then
    echo "install-chromium: $(command -v chromium) is installed"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install-chromium: chromium is missing and this is not root: the browser tests will" \
         "skip (install Debian's chromium package to run them)"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-chromium: chromium is missing and there is no apt-get: the browser tests" \
         "will skip"
    exit 0
fi
if DEBIAN_FRONTEND=noninteractive apt-get install -y chromium \
        || { apt-get update && DEBIAN_FRONTEND=noninteractive \
             apt-get install -y chromium; }; then
    echo "install-chromium: installed $(command -v chromium)"
else
    echo "install-chromium: apt-get could not install chromium: the browser tests will skip"
fi
exit 0
