#!/usr/bin/env bash
# Cross-builds the device agent for aarch64 and armv7 (edge profile), reports the binary sizes,
# and runs both builds under qemu-user against our x86 broker: `check` must pass and a QoS 1
# `publish` must reach a service. Needs root for the installs on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

targets=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)
rustup target add "${targets[@]}" >/dev/null
missing=()
command -v aarch64-linux-gnu-gcc >/dev/null || missing+=(gcc-aarch64-linux-gnu)
command -v arm-linux-gnueabihf-gcc >/dev/null || missing+=(gcc-arm-linux-gnueabihf)
command -v qemu-aarch64 >/dev/null || missing+=(qemu-user)
command -v mosquitto_sub >/dev/null || missing+=(mosquitto-clients)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_ARMV7_UNKNOWN_LINUX_GNUEABIHF_LINKER=arm-linux-gnueabihf-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export CC_armv7_unknown_linux_gnueabihf=arm-linux-gnueabihf-gcc
for target in "${targets[@]}"; do
  cargo build --quiet --profile edge -p device-agent --target "$target"
  printf 'device-agent %-32s %8d bytes\n' "$target" "$(stat -c %s "target/$target/edge/device-agent")"
done

# A fleet, our broker on a free port, and a service listening.
cargo build --quiet --bin provision --bin broker
work=$(mktemp -d)
broker_pid=""
sub_pid=""
cleanup() {
  [ -n "$sub_pid" ] && kill "$sub_pid" 2>/dev/null
  [ -n "$broker_pid" ] && kill "$broker_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
provision=target/debug/provision
$provision init --pki "$work/pki" >/dev/null
$provision broker --pki "$work/pki" --out "$work/broker" --dns localhost >/dev/null
$provision service --pki "$work/pki" --name ingest --out "$work/services" >/dev/null
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
BROKER__LISTEN="127.0.0.1:$port" target/debug/broker --config "$work/broker/broker.toml" 2>"$work/broker.log" &
broker_pid=$!
for _ in $(seq 1 100); do grep -q "listening on" "$work/broker.log" && break; sleep 0.1; done
grep -q "listening on" "$work/broker.log" || { cat "$work/broker.log"; exit 1; }

declare -A qemu=([aarch64-unknown-linux-gnu]="qemu-aarch64 -L /usr/aarch64-linux-gnu" [armv7-unknown-linux-gnueabihf]="qemu-arm -L /usr/arm-linux-gnueabihf")
for target in "${targets[@]}"; do
  id="qemu-${target%%-*}"
  $provision device --pki "$work/pki" --id "$id" --out "$work/devices" --broker-url "mqtts://localhost:$port" >/dev/null
  s="$work/services/ingest"
  stdbuf -oL mosquitto_sub -d -h localhost -p "$port" --cafile "$s/broker-ca.crt" --cert "$s/service.crt" --key "$s/service.key" \
    -i ingest -t "devices/$id/telemetry" -q 1 -C 1 -W 30 >"$work/sub.out" 2>&1 &
  sub_pid=$!
  for _ in $(seq 1 100); do grep -q "received SUBACK" "$work/sub.out" && break; sleep 0.1; done
  ${qemu[$target]} "target/$target/edge/device-agent" check --config "$work/devices/$id/agent.toml"
  ${qemu[$target]} "target/$target/edge/device-agent" publish --config "$work/devices/$id/agent.toml" --topic telemetry --message "from $target"
  wait "$sub_pid"
  sub_pid=""
  grep -q "from $target" "$work/sub.out" || { echo "the service did not receive the $target message"; cat "$work/sub.out"; exit 1; }
  echo "$target under qemu: check passed, QoS 1 publish received by the service"
done
