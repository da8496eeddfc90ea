#!/usr/bin/env bash
# Clone the pinned upstream and fetch the profile's model files into the deployment.
# Usage: ./scripts/fetch.sh [--profile P] [--verify] [--with-optional] [--from-bundle DIR]
exec "$(dirname "$0")/sdrecipe" fetch "$@"
