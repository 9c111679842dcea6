#!/usr/bin/env bash
# Debian packages the tests use: redis-server (the livekit-server cluster tests), sip-tester
# (sipp), espeak-ng, sox, iproute2 (network namespaces). Installs the missing ones, quietly, when
# run as root with apt-get; otherwise (or if apt fails) says so and exits 0: the tests that need
# a missing tool skip with a reason naming it.
set -uo pipefail
PACKAGES=(redis-server sip-tester espeak-ng sox iproute2)

missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$pkg")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "system packages: all present"
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "system packages: missing ${missing[*]} (not root or no apt-get); their tests will skip"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
# no package service (redis on 6379) is started: the tests start their own on free ports
policy=/usr/sbin/policy-rc.d
own_policy=""
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && own_policy=1
fi
if apt-get update -qq >/dev/null 2>&1 \
    && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
    echo "system packages: installed ${missing[*]}"
else
    echo "system packages: could not install ${missing[*]}; their tests will skip"
fi
[ -n "$own_policy" ] && rm -f "$policy"
exit 0
