#!/usr/bin/env bash
# Run verify or a prompt batch as a Slurm job; follows it and collects the results.
# Usage: ./scripts/submit.sh verify [--profile P] [--smoke] | generate --prompts FILE [options]
exec "$(dirname "$0")/sdrecipe" submit "$@"
