#!/usr/bin/env bash
# ensure-debs.sh CHECK:PACKAGE ...: installs each Debian PACKAGE whose CHECK
# (a command on PATH, or an absolute file path) is missing. Needs root and
# apt; does nothing when everything is there.
set -euo pipefail
missing=()
for pair in "$@"; do
  check=${pair%%:*} pkg=${pair#*:}
  if [[ $check == /* ]]; then [[ -e $check ]] && continue
  else command -v "$check" >/dev/null 2>&1 && continue
  fi
  missing+=("$pkg")
done
((${#missing[@]})) || exit 0
mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
if [[ $(id -u) -ne 0 ]]; then
  echo "missing Debian packages: ${missing[*]} (run as root or: sudo apt-get install ${missing[*]})" >&2
  exit 1
fi
echo "installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
