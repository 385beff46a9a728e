#!/usr/bin/env bash
# Makes this host run the emulated arm64 phone (android_harness/arm64.py): qemu user mode through
# binfmt_misc, and debootstrap to build the phone's Debian arm64 rootfs. As root; idempotent.
set -euo pipefail
if [ "$(id -u)" != "0" ]; then
  echo "arm64 host setup: needs root (apt-get, mount, update-binfmts)" >&2
  exit 1
fi
missing=()
command -v qemu-aarch64-static >/dev/null 2>&1 || missing+=(qemu-user-static)
command -v debootstrap >/dev/null 2>&1 || missing+=(debootstrap)
command -v update-binfmts >/dev/null 2>&1 || missing+=(binfmt-support)
if [ ${#missing[@]} -gt 0 ]; then
  echo "arm64 host setup: installing ${missing[*]} (apt)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
[ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
update-binfmts --enable qemu-aarch64 2>/dev/null || true
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || { echo "arm64 host setup: qemu-aarch64 is not registered in binfmt_misc" >&2; exit 1; }
echo "arm64 host setup: qemu-aarch64 through binfmt_misc, debootstrap: ready"
