#!/usr/bin/env bash
# Eclipse Paho's MQTT interoperability client suite against our broker, over mutual TLS with a service
# identity. The suite and its runner are not in this repository: they live in the workplace's shared
# folder (../shared/conformance/paho beside the repository, or /work/shared/conformance/paho), or
# wherever PAHO_DIR points.
#
# Usage: scripts/paho.sh [BIN_DIR] [3|5]   (BIN_DIR holds `broker` and `provision`; default target/debug;
# 3 is MQTT 3.1.1's suite, about 50 s; 5 is MQTT 5's, about 4 minutes, mostly the suite's own waits)
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
if [ "$version" = 5 ]; then
  # The MQTT 5 suite's test_server_keep_alive expects a broker that caps keepalives at 60 s
  # (limits.max_keep_alive_secs; ours defaults to 1200), and test_shared_subscriptions needs the
  # one setting of the suite's __main__ block that the runner skips (see paho-shim/).
  export BROKER__LIMITS__MAX_KEEP_ALIVE_SECS=60
  export PYTHONPATH="$PWD/scripts/paho-shim${PYTHONPATH:+:$PYTHONPATH}"
fi
# The failures of one run of the suite, as a sorted list.
run_suite() {
  out=$("$suite/run.sh" "$bin" "$version")
  echo "$out"
  failed=$(echo "$out" | awk '$1 == "FAIL" { print $2 }' | sort | tr '\n' ' ')
  passed=$(echo "$out" | grep -c '^PASS ')
}
run_suite
# Two MQTT 5 tests race a SUBSCRIBE on one connection against a PUBLISH on another (README,
# "Conformance"): one of them losing that race, and nothing else failing, earns one more run.
others=$(echo "$failed" | tr ' ' '\n' | grep -v -e '^$' -e '^test_subscribe_failure$' \
  | grep -v -x -e test_request_response -e test_subscribe_options)
if [ "$version" = 5 ] && [ "$failed" != "test_subscribe_failure " ] && [ -z "$others" ]; then
  echo "scripts/paho.sh: $failed: a SUBSCRIBE/PUBLISH race across connections was lost; running the suite once more"
  run_suite
fi
if [ "$failed" != "test_subscribe_failure " ] || [ "$passed" -lt 1 ]; then
  echo "scripts/paho.sh: expected only test_subscribe_failure to fail; failed: ${failed:-none}" >&2
  exit 1
fi
echo "scripts/paho.sh: MQTT $version suite: $passed passed, test_subscribe_failure failed as expected"
