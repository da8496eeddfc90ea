#!/usr/bin/env bash
# Deploy: fetch, apply patches, build the environment, preseed and verify (each stage once).
# Usage: ./scripts/deploy.sh [--profile P] [--smoke] [--python PATH] [--source DIR]
exec "$(dirname "$0")/sdrecipe" deploy "$@"
