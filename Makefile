# wpfs: the two commands a newcomer needs, plus install.
#
#   sudo make demo      install build deps, build, run a one-node wpfs mounted at /tmp/wpfs-demo/mnt
#   sudo make test      install build deps, build, run every test (what .ci/run runs)
#   sudo make install   put wpfs in /usr/local/bin and mount.wpfs in /sbin (for fstab)
#
# The build goes to /var/tmp/wpfs-target (.cargo/config.toml); ccache keeps
# RocksDB's C++ build (~17 min cold on 2 cores) to about half a minute warm.

SHELL := /bin/bash
TARGET ?= /var/tmp/wpfs-target
BIN := $(TARGET)/debug
DEMO ?= /tmp/wpfs-demo
export CC := ccache cc
export CXX := ccache c++

.PHONY: deps build demo test lint test-rust conformance install clean-demo

deps:
	@if ! dpkg -s fuse3 libclang-dev ccache protobuf-compiler wordpress >/dev/null 2>&1; then \
	  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
	    fuse3 libclang-dev clang ccache protobuf-compiler pkg-config wordpress diffutils util-linux; \
	fi

build: deps
	cargo build --workspace --bins
	ln -sf wpfs $(BIN)/mount.wpfs

demo: build
	@mkdir -p $(DEMO)/mnt
	@if [ ! -e $(DEMO)/data/wpfs.json ]; then \
	  $(BIN)/wpfs init --data $(DEMO)/data --node-id 1 --listen 127.0.0.1:7400 --admin 127.0.0.1:7401; fi
	@mountpoint -q $(DEMO)/mnt || $(BIN)/wpfs mount $(DEMO)/data $(DEMO)/mnt -o allow_other
	@cp -a /usr/share/wordpress/wp-content/. $(DEMO)/mnt/ 2>/dev/null || true
	@echo; echo "wpfs is mounted at $(DEMO)/mnt:"; ls -la $(DEMO)/mnt; echo
	@$(BIN)/wpfs status --data $(DEMO)/data
	@echo; echo "health: curl http://127.0.0.1:7401/health   stop: umount $(DEMO)/mnt"

clean-demo:
	-umount $(DEMO)/mnt
	rm -rf $(DEMO)

test: build lint test-rust conformance

lint:
	cargo fmt --all --check
	cargo clippy --workspace --all-targets -- -D warnings

test-rust:
	cargo test --workspace -- --test-threads=2

conformance: build
	tests/conformance.sh $(BIN)

install: build
	install -m 0755 $(BIN)/wpfs /usr/local/bin/wpfs
	ln -sf /usr/local/bin/wpfs /sbin/mount.wpfs
	@echo "installed; fstab: /var/lib/wpfs  /var/www/html/wp-content  wpfs  defaults,_netdev,allow_other  0 0"
