#!/usr/bin/env bash
# Runs every test Kiln has: Rust unit, integration and parity tests, then the
# end-to-end tests that drive `kiln serve` with the official MLflow and
# tritonclient Python clients. Works on a fresh machine with Rust and Python 3.11+.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --locked --workspace
cargo test --locked --workspace
# The CPU kernels dispatch at run time to the best SIMD level this CPU has;
# run them again on the lower paths, so each path is tested on every machine.
for level in avx2 portable; do
    KILN_SIMD=$level cargo test --locked -p kiln-engine --lib
done

# The official clients live in a project-local virtualenv, rebuilt when the
# pinned requirements change.
venv=.venv
stamp="$venv/.requirements"
if [ ! -x "$venv/bin/pytest" ] || ! cmp -s tests/python/requirements.txt "$stamp"; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/python/requirements.txt
    cp tests/python/requirements.txt "$stamp"
fi
KILN_BIN="$PWD/target/debug/kiln" "$venv/bin/pytest" tests/python -q -p no:cacheprovider
