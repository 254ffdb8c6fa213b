#!/usr/bin/env bash
# Sets up everything on a fresh Python 3.11 machine, then runs one job:
#   bash run.sh quickstart   # the main job
#   bash run.sh test         # the test suite (extra pytest arguments are passed on)
# The first run creates .venv and installs t5x_lite into it; later runs reuse it.
set -euo pipefail
cd "$(dirname "$0")"

job=${1:-}
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3

install() {  # $1: pip extras, e.g. "[test]"
  local stamp=".venv/.installed$1"
  if [[ ! -x .venv/bin/python ]]; then
    "$python" -m venv .venv
    .venv/bin/pip install --quiet --upgrade pip
  fi
  if [[ ! -f $stamp || setup.py -nt $stamp ]]; then
    .venv/bin/pip install --quiet -e ".$1"
    touch "$stamp"
  fi
}

tcmalloc() {  # the allocator the CLI re-executes itself with (t5x_lite/allocator.py)
  compgen -G ".venv/lib/tcmalloc/libtcmalloc*" >/dev/null && return
  /sbin/ldconfig -p 2>/dev/null | grep -q libtcmalloc && return
  local tmp
  tmp=$(mktemp -d)
  # Debian's package, unpacked into the venv: no root needed. Elsewhere the CLI falls back
  # to glibc malloc with huge pages (slower; the README says how to install tcmalloc).
  if (cd "$tmp" && apt-get download -qq libtcmalloc-minimal4) >/dev/null 2>&1 \
      && dpkg-deb -x "$tmp"/libtcmalloc-minimal4_*.deb "$tmp/root"; then
    mkdir -p .venv/lib/tcmalloc
    cp -L "$tmp"/root/usr/lib/*/libtcmalloc_minimal.so.4 .venv/lib/tcmalloc/ 2>/dev/null \
        || rm -rf .venv/lib/tcmalloc
  fi
  rm -rf "$tmp"
}

case "$job" in
  quickstart)
    install ""
    tcmalloc
    .venv/bin/python -m t5x_lite.main info --config=configs/quickstart.py
    .venv/bin/python -m t5x_lite.main train --config=configs/quickstart.py \
        --workdir=runs/quickstart
    .venv/bin/python -m t5x_lite.main eval --config=configs/quickstart.py \
        --workdir=runs/quickstart
    ;;
  test)
    install "[test]"
    tcmalloc
    shift
    status=0
    .venv/bin/python -m pytest "$@" || status=$?
    if [[ $status == 5 ]]; then
      echo "error: pytest collected no tests: the suite or its set-up is broken." >&2
    fi
    exit $status
    ;;
  *)
    echo "usage: bash run.sh {quickstart|test} [pytest args]" >&2
    exit 2
    ;;
esac
