#!/usr/bin/env bash
# The whole devgate test suite: the README's test command, and what CI runs (.ci/run).
# Installs missing packages, then: formatting, single-header freshness, doc comments on every
# public name, the suite built plain (GCC at -O3, asserts kept), under ASan+UBSan (Clang) and
# under TSan (GCC, against the single header), the meson build, the consumer projects, and the
# fuzzers. Every build here turns warnings into errors (DEVGATE_WERROR=ON, meson --werror), which
# devgate's build files leave off for users. Prints "steps: N passed, M failed" last and exits
# non-zero if any step failed. FUZZ_SECONDS (default 40) bounds each fuzzer's run.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

scripts/install-deps.sh test || { echo "install-deps failed"; exit 1; }

build=${DEVGATE_BUILD_DIR:-$root/build}
fuzz_seconds=${FUZZ_SECONDS:-40}
jobs=$(nproc)
passed=0
failed=0
failed_steps=()
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export TSAN_OPTIONS=${TSAN_OPTIONS:-suppressions=$root/tests/tsan.supp:halt_on_error=1:second_deadlock_stack=1}
export CTEST_OUTPUT_ON_FAILURE=1

step() {
  local name=$1
  shift
  local start=$SECONDS
  echo
  echo "::: $name"
  if "$@"; then
    passed=$((passed + 1))
    echo "::: $name: passed in $((SECONDS - start)) s"
  else
    failed=$((failed + 1))
    failed_steps+=("$name")
    echo "::: $name: FAILED after $((SECONDS - start)) s"
  fi
}

format_check() {
  # single_include/ is generated (and checked against include/ by the next step).
  git ls-files -z '*.hpp' '*.cpp' '*.h' ':!single_include/' | xargs -0 -r clang-format --dry-run --Werror
}

# cmake_suite <dir> <cmake args...>: configure, build everything, run CTest.
cmake_suite() {
  local dir=$1
  shift
  cmake -S "$root" -B "$dir" -G Ninja "$@" >"$dir.configure.log" 2>&1 ||
    { cat "$dir.configure.log"; return 1; }
  cmake --build "$dir" -j "$jobs" || return 1
  # Tests run two at a time (those marked RUN_SERIAL alone: the browser, the attacks that read
  # the server's memory, the crash test).
  ctest --test-dir "$dir" --timeout 900 -j "$jobs"
}

smoke_benchmarks() {
  local ran=0
  for bench in "$build"/plain/benchmarks/*/devgate_bench_*; do
    [ -x "$bench" ] || continue
    "$bench" --benchmark_min_time=0.01 >/dev/null || { echo "benchmark $bench failed"; return 1; }
    ran=$((ran + 1))
  done
  echo "ran $ran benchmark binaries once each"
}

meson_suite() {
  rm -rf "$build/meson"
  # -O1 without debug info: this step checks that meson.build builds and runs everything; the
  # default debugoptimized (-O2 -g) compiles twice as slowly for nothing the other builds miss.
  meson setup --werror -Doptimization=1 -Ddebug=false "$build/meson" "$root" \
    >"$build/meson.setup.log" 2>&1 ||
    { cat "$build/meson.setup.log"; return 1; }
  meson test -C "$build/meson" --print-errorlogs --num-processes 1
}

fuzz() {
  cmake -S "$root" -B "$build/fuzz" -G Ninja -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_CXX_FLAGS="-O1 -g" \
    -DDEVGATE_WERROR=ON -DDEVGATE_BUILD_FUZZERS=ON -DDEVGATE_BUILD_TESTS=OFF -DDEVGATE_BUILD_EXAMPLES=OFF \
    -DDEVGATE_BUILD_BENCHMARKS=OFF >"$build/fuzz.configure.log" 2>&1 ||
    { cat "$build/fuzz.configure.log"; return 1; }
  cmake --build "$build/fuzz" -j "$jobs" || return 1
  local ran=0 pair target name
  # target:corpus pairs; each target runs on a scratch copy of its committed seed corpus.
  for pair in http_parser_fuzz:http frame_reader_fuzz:frame token_fuzz:token; do
    target="$build/fuzz/tests/fuzz/${pair%%:*}"
    name=${pair##*:}
    [ -x "$target" ] || { echo "fuzzer $target was not built"; return 1; }
    local work="$build/fuzz/corpus-$name"
    rm -rf "$work" && mkdir -p "$work" && cp "$root/tests/fuzz/corpus/$name"/* "$work"/
    echo "fuzzing ${pair%%:*} for $fuzz_seconds s"
    "$target" -max_total_time="$fuzz_seconds" -print_final_stats=1 "$work" \
      >"$build/fuzz/$name.log" 2>&1 || { tail -50 "$build/fuzz/$name.log"; return 1; }
    grep -E 'stat::number_of_executed_units|stat::peak_rss' "$build/fuzz/$name.log"
    ran=$((ran + 1))
  done
  [ "$ran" -eq 3 ]
}

mkdir -p "$build"
total_start=$SECONDS
step "format (clang-format --dry-run --Werror)" format_check
step "single header is up to date" scripts/amalgamate.py --check
step "every public name has a /// comment" scripts/check_doc_comments.py
# -O3 without NDEBUG: the optimiser's warnings of a release build, with asserts still checked.
# No -g: debug info makes this build a third slower, and the sanitizer builds carry it.
step "plain: GCC -O3, -Werror, tests + examples + benchmarks" cmake_suite "$build/plain" \
  -DCMAKE_CXX_COMPILER=g++ -DCMAKE_BUILD_TYPE= -DCMAKE_CXX_FLAGS="-O3" \
  -DDEVGATE_WERROR=ON -DDEVGATE_BUILD_BENCHMARKS=ON
step "benchmarks run once (smoke)" smoke_benchmarks
step "ASan+UBSan: Clang, -fno-sanitize-recover=all" cmake_suite "$build/asan" \
  -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE= -DCMAKE_CXX_FLAGS="-O1 -g" \
  -DDEVGATE_WERROR=ON -DDEVGATE_SANITIZE=address,undefined -DDEVGATE_BUILD_BENCHMARKS=OFF
step "TSan: GCC, against single_include/" cmake_suite "$build/tsan" \
  -DCMAKE_CXX_COMPILER=g++ -DCMAKE_BUILD_TYPE= -DCMAKE_CXX_FLAGS="-O1 -g" \
  -DDEVGATE_WERROR=ON -DDEVGATE_SANITIZE=thread -DDEVGATE_TEST_SINGLE_HEADER=ON \
  -DDEVGATE_BUILD_BENCHMARKS=OFF
step "meson: build and meson test" meson_suite
step "packaging: find_package, add_subdirectory, meson subproject, pkg-config" \
  tests/packaging/run.sh "$build/packaging"
step "fuzzing: libFuzzer, ASan+UBSan, ${fuzz_seconds} s per target" fuzz

echo
echo "total: $((SECONDS - total_start)) s"
for name in "${failed_steps[@]}"; do echo "failed: $name"; done
echo "steps: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
