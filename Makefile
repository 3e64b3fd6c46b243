# wpfs: the two commands a newcomer needs, plus install.
#
#   sudo make demo      install build deps, build, run a 3-node wpfs cluster mounted at /tmp/wpfs-demo/mnt{1,2,3}
#   sudo make test      install build deps, build, run every test (what .ci/run runs)
#   sudo make install   put wpfs in /usr/local/bin, mount.wpfs in /sbin (for fstab),
#                       the systemd unit and the logrotate snippet in /etc
#   make deb            build the Debian package into $(TARGET)/deb (packaging/build-deb.sh)
#
# The build goes to /var/tmp/wpfs-target (.cargo/config.toml); ccache keeps
# RocksDB's C++ build (17-33 min cold on 2 cores) to about half a minute warm.

SHELL := /bin/bash
TARGET ?= /var/tmp/wpfs-target
BIN := $(TARGET)/debug
DEMO ?= /tmp/wpfs-demo
export CC := ccache cc
export CXX := ccache c++

.PHONY: deps build demo test lint test-rust conformance install deb clean-demo

deps:
	@if ! dpkg -s fuse3 libclang-dev ccache protobuf-compiler wordpress iproute2 logrotate systemd >/dev/null 2>&1; then \
	  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
	    fuse3 libclang-dev clang ccache protobuf-compiler pkg-config wordpress diffutils util-linux iproute2 logrotate systemd; \
	fi

build: deps
	cargo build --workspace --bins
	ln -sf wpfs $(BIN)/mount.wpfs

demo: build
	@mkdir -p $(DEMO)/mnt1 $(DEMO)/mnt2 $(DEMO)/mnt3
	@if [ ! -e $(DEMO)/node1/wpfs.json ]; then \
	  $(BIN)/wpfs init --data $(DEMO)/node1 --node-id 1 --listen 127.0.0.1:7400 --admin 127.0.0.1:7401 >/dev/null; fi
	@mountpoint -q $(DEMO)/mnt1 || $(BIN)/wpfs mount $(DEMO)/node1 $(DEMO)/mnt1 -o allow_other
	@for n in 2 3; do \
	  [ -e $(DEMO)/node$$n/wpfs.json ] || $(BIN)/wpfs join --data $(DEMO)/node$$n --node-id $$n \
	    --listen 127.0.0.1:740$$((n * 2)) --peer 127.0.0.1:7400 --token $$($(BIN)/wpfs token --data $(DEMO)/node1) >/dev/null; \
	  mountpoint -q $(DEMO)/mnt$$n || $(BIN)/wpfs mount $(DEMO)/node$$n $(DEMO)/mnt$$n -o allow_other; \
	done
	@cp -a /usr/share/wordpress/wp-content/. $(DEMO)/mnt1/ 2>/dev/null || true
	@echo; echo "a 3-node wpfs cluster is mounted at $(DEMO)/mnt1, mnt2, mnt3."
	@echo "copied into mnt1, listed on mnt3:"; ls -la $(DEMO)/mnt3; echo
	@$(BIN)/wpfs status --data $(DEMO)/node1
	@echo; echo "health: curl http://127.0.0.1:7401/health   stop: umount $(DEMO)/mnt{1,2,3}"

clean-demo:
	-umount $(DEMO)/mnt1 $(DEMO)/mnt2 $(DEMO)/mnt3
	rm -rf $(DEMO)

test: build lint test-rust conformance

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings

test-rust:
	rm -f $(TARGET)/tmp/reliability-table.md
	cargo test --workspace -- --test-threads=2
	@echo "the fault suite's table (docs/reliability.md):"; \
	  cat $(TARGET)/tmp/reliability-table.md 2>/dev/null || echo "(none: the suite was skipped)"

conformance: build
	tests/conformance.sh $(BIN)

# The same files as the package, under /usr/local and /etc; an existing
# /etc/default/wpfs is kept.
install: build
	install -m 0755 $(BIN)/wpfs /usr/local/bin/wpfs
	ln -sf /usr/local/bin/wpfs /sbin/mount.wpfs
	ln -sf /usr/local/bin/wpfs /sbin/mount.fuse.wpfs
	install -d /etc/systemd/system /etc/logrotate.d
	sed 's|/usr/bin/wpfs|/usr/local/bin/wpfs|' packaging/wpfs.service > /etc/systemd/system/wpfs.service
	install -m 0644 packaging/wpfs.logrotate /etc/logrotate.d/wpfs
	[ -e /etc/default/wpfs ] || install -m 0644 packaging/wpfs.default /etc/default/wpfs
	-[ -d /run/systemd/system ] && systemctl daemon-reload
	@echo "installed; fstab: /var/lib/wpfs  /var/www/html/wp-content  fuse.wpfs  _netdev,nofail,allow_other,x-systemd.requires=network-online.target  0 0"
	@echo "or the unit: edit /etc/default/wpfs, then systemctl enable --now wpfs"

deb: build
	packaging/build-deb.sh $(BIN)/wpfs $(TARGET)/deb
