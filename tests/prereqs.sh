#!/usr/bin/env bash
# Installs what the local stack and the build need on Debian 12, when run as
# root; otherwise names the missing packages. Rust (rustup) and Go >= 1.24
# must already be on PATH: Debian 12's packages of both are too old.
set -euo pipefail

# command -> Debian package
declare -A PKGS=(
  [java]=openjdk-17-jre-headless
  # javac builds the Debezium value converter (debezium/converter).
  [javac]=openjdk-17-jdk-headless
  [mvn]=maven
  [jq]=jq
  [curl]=curl
  [kcat]=kcat
  [psql]=postgresql-client-15
  [cmake]=cmake
  [nix-instantiate]=nix-bin
)
missing=()
for cmd in "${!PKGS[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("${PKGS[$cmd]}")
done
[ -x /usr/lib/postgresql/15/bin/initdb ] || missing+=(postgresql-15)
# rdkafka's bundled librdkafka build includes curl (OIDC) support.
[ -f /usr/include/x86_64-linux-gnu/curl/curl.h ] || [ -f /usr/include/curl/curl.h ] || missing+=(libcurl4-openssl-dev)
[ -f /usr/include/zlib.h ] || missing+=(zlib1g-dev)
[ -f /usr/include/openssl/ssl.h ] || missing+=(libssl-dev)
# The lake readers (tests/readers.sh) live in a Python venv.
command -v python3 >/dev/null 2>&1 || missing+=(python3)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)

if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[prereqs] installing: ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "[prereqs] missing Debian packages: ${missing[*]} (sudo apt-get install ${missing[*]})" >&2
    exit 1
  fi
fi
for tool in cargo go; do
  command -v "$tool" >/dev/null 2>&1 || { echo "[prereqs] '$tool' not found: install Rust with rustup and Go >= 1.24 from go.dev" >&2; exit 1; }
done
