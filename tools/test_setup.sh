#!/usr/bin/env bash
# Things the tests need beyond the venv.
set -euo pipefail
