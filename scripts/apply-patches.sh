#!/usr/bin/env bash
# Apply the recipe's patch series to an upstream checkout, all or nothing.
# Usage: ./scripts/apply-patches.sh --source DIR [--profile P] [--force]
exec "$(dirname "$0")/sdrecipe" patch apply "$@"
