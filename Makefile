# jolt — build, test and package.
#
#   make build     release binary at target/release/jolt
#   make example   build jolt and run the bundled example (examples/hello)
#   make test      the whole test suite (unit and integration tests), after
#                  scripts/test-services made sure RabbitMQ and nginx are there
#   make cluster   a local build cluster (scripts/cluster start 2)
#   make lint      rustfmt, clippy and the deployment files (scripts/lint-deploy),
#                  as CI runs them
#   make static    statically linked x86_64 Linux binary at target/jolt-static
#   make bench     the benchmarks of scripts/bench

CARGO ?= cargo
STATIC_TARGET ?= x86_64-unknown-linux-musl

.PHONY: build example test lint static bench clean cluster

build:
	$(CARGO) build --release

example: build
	cd examples/hello && ../../target/release/jolt build default

test:
	scripts/test-services
	$(CARGO) test --no-fail-fast

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	scripts/lint-deploy

# musl gives a binary that needs no libc at all (DNS included). ring (TLS) compiles
# C for the target: musl-gcc comes with Debian's musl-tools. Where the musl target
# cannot be installed, fall back to glibc with a static C runtime.
static:
	@rustup target add $(STATIC_TARGET) >/dev/null 2>&1 || true
	@command -v musl-gcc >/dev/null || { echo "make static needs musl-gcc: apt-get install -y musl-tools"; exit 1; }
	@if rustup target list --installed 2>/dev/null | grep -qx $(STATIC_TARGET); then \
		CC_x86_64_unknown_linux_musl=musl-gcc $(CARGO) build --release --target $(STATIC_TARGET) && \
		cp target/$(STATIC_TARGET)/release/jolt target/jolt-static; \
	else \
		echo "musl target unavailable: linking glibc statically"; \
		RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --release --target x86_64-unknown-linux-gnu && \
		cp target/x86_64-unknown-linux-gnu/release/jolt target/jolt-static; \
	fi
	@file target/jolt-static 2>/dev/null || true
	@ls -l target/jolt-static

bench:
	scripts/bench

cluster: build
	scripts/cluster start 2

clean:
	$(CARGO) clean
