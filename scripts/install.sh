#!/usr/bin/env bash
# Creates .venv and installs the project with its test extras. torch and torchvision are
# pinned (pyproject.toml) and installed first, on their own, so pip resolves the pinned
# wheels instead of pulling a different CUDA build through another package's range.
# System packages the tests drive (headless Chromium for the UI test, PostgreSQL for the
# Postgres-backed Prefect server test) are apt-installed when missing, only as root with
# apt-get; otherwise a note says what to install (those tests then skip with the reason).
# DISTILLERY_SKIP_APT=1 turns the apt step off.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), f"Python >= 3.11 needed, found {sys.version}"'
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --upgrade --quiet pip
.venv/bin/python -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install --quiet -e ".[test]"

# Debian packages whose programs are missing (a failed apt step is a note, not an install failure)
apt_missing=()
command -v chromium >/dev/null || command -v chromium-browser >/dev/null || apt_missing+=(chromium)
command -v chromedriver >/dev/null || apt_missing+=(chromium-driver)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || apt_missing+=(postgresql)
apt_ok=1
if [ ${#apt_missing[@]} -gt 0 ]; then
    if [ "${DISTILLERY_SKIP_APT:-0}" != 1 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "apt-get install ${apt_missing[*]} (UI browser test, Postgres-backed Prefect server test)"
        export DEBIAN_FRONTEND=noninteractive
        # Another apt-get (unattended upgrades, a second install) may hold the dpkg lock: wait for
        # it, bounded, instead of giving up at once (apt's own lock timeout, in seconds).
        apt_wait=(-o "DPkg::Lock::Timeout=${DISTILLERY_APT_LOCK_TIMEOUT:-300}")
        if ! { apt-get "${apt_wait[@]}" update -qq >/dev/null && \
               apt-get "${apt_wait[@]}" install -y -qq --no-install-recommends "${apt_missing[@]}" >/dev/null; }; then
            echo "note: apt-get install ${apt_missing[*]} failed: the tests that need them will skip;" \
                 "the install is not marked complete, so the next 'make' retries it"
            apt_ok=0
        fi
    else
        echo "note: ${apt_missing[*]} not installed (needs root and apt-get): the UI browser test and" \
             "the PostgreSQL scale-out test will skip; install them with your package manager"
    fi
fi
# Marked complete only when every step that could run here did: a failed apt step is retried
# by the next `make` (the stamp is what make checks) instead of leaving tests skipping forever.
if [ "$apt_ok" = 1 ]; then
    touch .venv/.installed
    echo "installed distillery into .venv"
else
    rm -f .venv/.installed
    echo "installed distillery into .venv (without the system packages above)"
fi
