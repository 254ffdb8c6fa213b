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

case "$job" in
  quickstart)
    install ""
    .venv/bin/python -m t5x_lite.main info --config=configs/quickstart.py
    .venv/bin/python -m t5x_lite.main train --config=configs/quickstart.py \
        --workdir=runs/quickstart
    .venv/bin/python -m t5x_lite.main eval --config=configs/quickstart.py \
        --workdir=runs/quickstart
    ;;
  test)
    install "[test]"
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
