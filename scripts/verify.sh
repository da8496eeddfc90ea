#!/usr/bin/env bash
# Run a short txt2img sample in the built environment, offline, and write a report.
# Usage: ./scripts/verify.sh [--profile P] [--smoke] [--out DIR]
exec "$(dirname "$0")/sdrecipe" verify "$@"
