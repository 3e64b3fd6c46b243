#!/usr/bin/env bash
# Builds the Debian package wpfs_VERSION_ARCH.deb from an already built
# wpfs binary, with dpkg-deb: cargo-deb would build the workspace again in
# release mode, RocksDB included (~20 min cold on 2 cores).
#
#   packaging/build-deb.sh /var/tmp/wpfs-target/debug/wpfs OUTDIR
set -euo pipefail
bin=${1:?usage: build-deb.sh PATH/TO/wpfs OUTDIR}
out=${2:?usage: build-deb.sh PATH/TO/wpfs OUTDIR}
here=$(cd "$(dirname "$0")" && pwd)
top=$(dirname "$here")
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$top/Cargo.toml" | head -n 1)
arch=$(dpkg --print-architecture)
stage=$(mktemp -d)
chmod 0755 "$stage"
trap 'rm -rf "$stage"' EXIT

install -d "$stage/DEBIAN" "$stage/usr/bin" "$stage/sbin" "$stage/lib/systemd/system" \
  "$stage/etc/default" "$stage/etc/logrotate.d" "$stage/usr/share/doc/wpfs"
strip --strip-debug -o "$stage/usr/bin/wpfs" "$bin"
chmod 0755 "$stage/usr/bin/wpfs"
# mount(8) runs mount.wpfs for type wpfs and mount.fuse.wpfs for fuse.wpfs.
ln -s /usr/bin/wpfs "$stage/sbin/mount.wpfs"
ln -s /usr/bin/wpfs "$stage/sbin/mount.fuse.wpfs"
install -m 0644 "$here/wpfs.service" "$stage/lib/systemd/system/wpfs.service"
install -m 0644 "$here/wpfs.default" "$stage/etc/default/wpfs"
install -m 0644 "$here/wpfs.logrotate" "$stage/etc/logrotate.d/wpfs"
install -m 0644 "$top/README.md" "$top"/docs/*.md "$stage/usr/share/doc/wpfs/"
printf 'wpfs\nLicense: Apache-2.0 (/usr/share/common-licenses/Apache-2.0)\n' \
  > "$stage/usr/share/doc/wpfs/copyright"

printf '/etc/default/wpfs\n/etc/logrotate.d/wpfs\n' > "$stage/DEBIAN/conffiles"
# systemd picks up the unit; nothing is enabled or started: the node needs
# `wpfs init` or `wpfs join` first.
for script in postinst postrm; do
  printf '#!/bin/sh\nset -e\nif [ -d /run/systemd/system ]; then systemctl daemon-reload || true; fi\n' \
    > "$stage/DEBIAN/$script"
  chmod 0755 "$stage/DEBIAN/$script"
done
# On removal (not on an upgrade: a running node keeps its build until it is
# restarted, one node at a time) stop the unit, which unmounts cleanly.
# Nodes mounted from /etc/fstab run on until unmounted.
printf '#!/bin/sh\nset -e\nif [ "$1" = remove ] && [ -d /run/systemd/system ]; then systemctl stop wpfs.service || true; fi\n' \
  > "$stage/DEBIAN/prerm"
chmod 0755 "$stage/DEBIAN/prerm"
# ldd of the binary: libc, libm, libstdc++ and libgcc_s (RocksDB is C++,
# linked in statically); fuse3 brings /dev/fuse's tools and fuse.conf.
# The lowest versions: from the newest symbol versions the binary uses.
newest() { objdump -T "$bin" | grep -o "$1[0-9.]*" | sed "s/^$1//" | sort -uV | tail -n 1; }
glibc=$(newest GLIBC_)
case $(newest GLIBCXX_) in # libstdc++'s symbol version -> the GCC that brought it
  3.4.3[0-9]*) stdcxx=" (>= 12)" ;;
  3.4.29) stdcxx=" (>= 11)" ;;
  3.4.28) stdcxx=" (>= 10)" ;;
  *) stdcxx="" ;;
esac
cat > "$stage/DEBIAN/control" <<CONTROL
Package: wpfs
Version: $version
Architecture: $arch
Maintainer: wpfs developers <wpfs@localhost>
Section: admin
Priority: optional
Depends: fuse3, libc6${glibc:+ (>= $glibc)}, libstdc++6$stdcxx, libgcc-s1
Recommends: logrotate
Installed-Size: $(du -sk "$stage" | cut -f1)
Description: replicated filesystem for WordPress wp-content
 wpfs mounts the same wp-content on every web node of a site: the
 namespace is a Raft log, contents live in each node's RocksDB and
 replicate in the background, and reads never leave the node.
CONTROL

mkdir -p "$out"
deb="$out/wpfs_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
echo "$deb"
