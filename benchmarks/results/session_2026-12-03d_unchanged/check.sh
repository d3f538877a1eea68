#!/usr/bin/env bash
# Built-ins after the meter's module-backward, keyword-input and subclass changes (6caf45c..9af6a15)
# and the workers' watch on the run (4e6a569): the same commands and comparison as
# ../session_2026-12-03c_unchanged/check.sh, into /tmp/chk3/runs.
OUT=/tmp/chk3/runs bash "$(dirname "$0")/../session_2026-12-03c_unchanged/check.sh"
