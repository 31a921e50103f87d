#!/usr/bin/env bash
# Installs Debian's SLURM and munge packages for the single-node cluster test (tests/test_slurm.py),
# which `make test` runs. Never fails the build: where the packages cannot be installed it says why,
# and the test is then skipped with that reason.
set -u
PACKAGES="slurmctld slurmd slurm-client munge"
PROGRAMS="slurmctld slurmd sbatch squeue scontrol srun munged mungekey"

missing=""
for program in $PROGRAMS; do
    PATH="$PATH:/usr/sbin:/sbin" command -v "$program" >/dev/null 2>&1 || missing="$missing $program"
done
[ -z "$missing" ] && exit 0

skip() { echo "SLURM cluster test: $1; tests/test_slurm.py will be skipped." >&2; exit 0; }
[ "$(id -u)" = 0 ] || skip "not root, so not installing $PACKAGES (missing:$missing)"
command -v apt-get >/dev/null 2>&1 || skip "no apt-get to install $PACKAGES (missing:$missing)"

echo "Installing $PACKAGES (apt-get) for the SLURM cluster test..." >&2
log="$(mktemp)"
if { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        $PACKAGES; } >"$log" 2>&1; then
    rm -f "$log"
else
    tail -n 5 "$log" >&2
    rm -f "$log"
    skip "apt-get could not install $PACKAGES"
fi
