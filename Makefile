# Entry points for people and CI. See README.md.
.PHONY: demo test lint bench load

demo:  ## serve on the embedded default with the examples deployed
	./scripts/demo.sh

test:  ## the whole test suite
	./scripts/test.sh

lint:  ## formatting and clippy, host and guests
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --locked -- -D warnings
	cd functions && cargo fmt --all --check && cargo clippy --release --locked -- -D warnings

bench:  ## criterion: pooled vs on-demand instantiation
	cargo bench -p hearth-engine --bench instantiate

load:  ## wrk against a release server: echo req/s, p50/p99
	./scripts/load.sh
