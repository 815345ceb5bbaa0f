#!/usr/bin/env bash
# The side-by-side benchmark in one command: bench/compare.py with the project's
# Python (it installs aiosmtpd and Postfix's smtp-source/smtp-sink if missing).
#   bash bench/compare.sh --quick      # a few minutes
#   bash bench/compare.sh              # full: 3 rounds, under 20 minutes
#   bash bench/compare.sh --scenarios smtp-source:20:1k:many \
#       --servers fastsmtp-off,fastsmtp-base-off,aiosmtpd-maildir,smtp-sink \
#       --baseline OLD_TREE --baseline-label COMMIT --duration 5
#                                      # the key figure against an older tree (~2 minutes)
#   bash bench/compare.sh --scenarios smtp-source:20:1k:many,smtp-source:20:100k:many \
#       --servers fastsmtp-off,fastsmtp-batch,fastsmtp-always,postfix-maildir,smtp-sink --duration 3
#                                      # the journal issue's goals, Postfix's own durable Maildir
#                                      # among the servers (needs root; ~3 minutes)
# PYTHON=/path/to/python overrides the interpreter (it must import fastsmtp).
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-}"
if [ -z "$py" ]; then
    for candidate in .venv/bin/python /tmp/venv/bin/python python3; do
        if command -v "$candidate" >/dev/null && "$candidate" -c 'import fastsmtp' 2>/dev/null; then
            py="$candidate"
            break
        fi
    done
fi
if [ -z "$py" ]; then
    echo "compare.sh: no Python that imports fastsmtp; set PYTHON or: pip install -e '.[bench]'" >&2
    exit 2
fi
exec "$py" bench/compare.py "$@"
