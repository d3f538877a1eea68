#!/usr/bin/env bash
# Built-ins after the runner's put-back of buffers, config, hooks and patched forwards (7e7ac4c..94f3f8c)
# and the meter's recurrent backward (ce20daa): the same commands and comparison as
# ../session_2026-12-03c_unchanged/check.sh, into /tmp/chk4/runs.
OUT=/tmp/chk4/runs bash "$(dirname "$0")/../session_2026-12-03c_unchanged/check.sh"
