#!/usr/bin/env bash
# Re-creates third_party/gloo/: the gloo headers that torch's
# ProcessGroupGloo.hpp includes (the torch wheel ships c10d's headers and
# gloo's compiled code, but not gloo's headers). They come from Debian's
# libgloo-dev package; only declarations are used (classes the wheel's
# libtorch_cpu implements), and every gloo type appears in c10d's classes
# behind a pointer, so their layout does not depend on the gloo version.
# Usage: scripts/vendor_gloo.sh   (needs apt-get download and dpkg-deb)
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && apt-get download libgloo-dev >/dev/null && dpkg-deb -x libgloo-dev_*.deb root)
headers="algorithm.h common/common.h common/error.h common/logging.h common/string.h
  context.h math.h rendezvous/store.h transport/address.h transport/buffer.h
  transport/context.h transport/device.h transport/pair.h transport/unbound_buffer.h types.h"
rm -rf third_party/gloo/gloo
for h in $headers; do
  install -D -m 644 "$tmp/root/usr/include/gloo/$h" "third_party/gloo/gloo/$h"
done
cp "$tmp/root/usr/share/doc/libgloo-dev/copyright" third_party/gloo/LICENSE
echo "third_party/gloo: $(ls "$tmp"/libgloo-dev_*.deb | xargs -n1 basename)"
