#!/usr/bin/env bash
# Headless Chromium (Debian package `chromium`) for the test that opens a study's HTML report and takes
# a screenshot (tests/test_evaluation*.py); the test skips when no browser is installed.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then exit 0; fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core
