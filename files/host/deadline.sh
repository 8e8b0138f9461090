#!/bin/sh
# A host command under its deadline: pyinfra's shell for the deploy's commands (tasks/host/deadline.py), so
# pyinfra runs `deadline.sh SECONDS KILL_AFTER SETTING SHELL -c COMMAND`, after sudo or su if any. After
# SECONDS, `timeout` sends TERM, then CONT (so a stopped process gets it), to the command's whole process
# group, and KILL KILL_AFTER seconds later: a probe blocked on a FIFO or a process someone stopped ends.
# The status is then 124, and the command's end says so: on stderr for people, and on stdout as the line
# "@@mlstack-deadline SECONDS SETTING", which readers of a command's output (the host probe) look for.
# usage: deadline.sh SECONDS KILL_AFTER SETTING SHELL -c COMMAND
seconds=$1 kill_after=$2 setting=$3 shell=$4
shift 4
start=$(date +%s)
timeout -k "$kill_after" "$seconds" "$shell" "$@"
status=$?
# 124: TERM was sent; 137: KILL too. A command of its own exiting so before the deadline is not stopped.
if { [ "$status" = 124 ] || [ "$status" = 137 ]; } && [ $(($(date +%s) - start)) -ge "$seconds" ]; then
    printf '\n@@mlstack-deadline %s %s\n' "$seconds" "$setting"
    echo "stopped at its deadline, after $seconds s ($setting), and its processes on the host killed:" \
        "raise $setting if this host needs longer" >&2
    exit 124
fi
exit "$status"
