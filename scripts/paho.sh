#!/usr/bin/env bash
# Eclipse Paho's MQTT interoperability client suite against our broker, over mutual TLS with a service
# identity. The suite and its runner are not in this repository: they live in the workplace's shared
# folder (../shared/conformance/paho beside the repository, or /work/shared/conformance/paho), or
# wherever PAHO_DIR points.
#
# Usage: scripts/paho.sh [BIN_DIR] [3|5]   (BIN_DIR holds `broker` and `provision`; default target/debug)
# Passes when every test passes except test_subscribe_failure, which expects the broker to refuse a
# subscription to test/nosubscribe: a service's allow-list ACL that grants `#` cannot express that
# (MQTT 3.1.1 section 3.9.3 leaves the refusal to the server's authorization).
set -u
cd "$(dirname "$0")/.."
bin=${1:-target/debug}
version=${2:-3}
suite=${PAHO_DIR:-}
if [ -z "$suite" ]; then
  for candidate in ../shared/conformance/paho /work/shared/conformance/paho; do
    [ -x "$candidate/run.sh" ] && { suite=$candidate; break; }
  done
fi
if [ -z "$suite" ] || [ ! -x "$suite/run.sh" ]; then
  echo "scripts/paho.sh: Eclipse Paho's interoperability suite (its run.sh) is not in" \
    "${suite:-../shared/conformance/paho or /work/shared/conformance/paho}: set PAHO_DIR to the folder that holds it" >&2
  exit 1
fi
for program in broker provision; do
  [ -x "$bin/$program" ] || { echo "scripts/paho.sh: $bin/$program is missing: build it first (cargo build)" >&2; exit 1; }
done
command -v python3 >/dev/null || { echo "scripts/paho.sh: needs python3" >&2; exit 1; }
out=$("$suite/run.sh" "$bin" "$version")
echo "$out"
failed=$(echo "$out" | awk '$1 == "FAIL" { print $2 }' | sort | tr '\n' ' ')
passed=$(echo "$out" | grep -c '^PASS ')
if [ "$failed" != "test_subscribe_failure " ] || [ "$passed" -lt 1 ]; then
  echo "scripts/paho.sh: expected only test_subscribe_failure to fail; failed: ${failed:-none}" >&2
  exit 1
fi
echo "scripts/paho.sh: MQTT $version suite: $passed passed, test_subscribe_failure failed as expected"
