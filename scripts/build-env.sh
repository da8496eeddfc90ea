#!/usr/bin/env bash
# Build a profile's environment from its lock (no solver), then run the offline import check.
# Usage: ./scripts/build-env.sh [--profile P] [--prefix DIR] [--python PATH] [--force]
exec "$(dirname "$0")/sdrecipe" env build "$@"
