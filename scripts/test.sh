#!/usr/bin/env bash
# Install everything the tests need into ./.venv and run them (CPU only, no network but the registries).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS=test bash scripts/setup.sh
# Headless Chromium for the FiftyOne App test (Debian package); skipped when we cannot install it
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: could not install chromium; the App screenshot test will be skipped"
fi
export FIFTYONE_DATABASE_VALIDATION=false
exec .venv/bin/python -m pytest -ra "$@"
