#!/usr/bin/env bash
# Builds and runs the consumer program the four ways users consume devgate:
# find_package against an install prefix, add_subdirectory, a meson subproject, and pkg-config.
# Usage: tests/packaging/run.sh <scratch-dir>
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
scratch=${1:?usage: run.sh <scratch-dir>}
rm -rf "$scratch" && mkdir -p "$scratch"
launcher=()
command -v ccache >/dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)

echo "== packaging: install devgate to a temporary prefix"
cmake -S "$root" -B "$scratch/devgate-build" -G Ninja -DCMAKE_INSTALL_PREFIX="$scratch/prefix" \
  -DDEVGATE_BUILD_TESTS=OFF -DDEVGATE_BUILD_EXAMPLES=OFF -DDEVGATE_BUILD_BENCHMARKS=OFF >/dev/null
cmake --install "$scratch/devgate-build" >/dev/null
test -f "$scratch/prefix/share/cmake/devgate/devgate-config.cmake"
test -f "$scratch/prefix/share/pkgconfig/devgate.pc"
test -f "$scratch/prefix/share/cmake/devgate/devgate-sqlite-targets.cmake"
test -f "$scratch/prefix/share/pkgconfig/devgate-sqlite.pc"
test -f "$scratch/prefix/share/cmake/devgate/devgate-redis-targets.cmake"
test -f "$scratch/prefix/share/pkgconfig/devgate-redis.pc"

echo "== packaging: find_package(devgate CONFIG REQUIRED)"
cmake -S "$here/cmake_consumer" -B "$scratch/find_package" -G Ninja "${launcher[@]}" \
  -DCMAKE_PREFIX_PATH="$scratch/prefix" -DDEVGATE_CONSUMER_MODE=find_package >/dev/null
cmake --build "$scratch/find_package" >/dev/null
"$scratch/find_package/consumer"
"$scratch/find_package/sqlite_consumer"
"$scratch/find_package/redis_consumer"

echo "== packaging: add_subdirectory(devgate)"
cmake -S "$here/cmake_consumer" -B "$scratch/add_subdirectory" -G Ninja "${launcher[@]}" \
  -DDEVGATE_CONSUMER_MODE=add_subdirectory -DDEVGATE_SOURCE_DIR="$root" >/dev/null
cmake --build "$scratch/add_subdirectory" >/dev/null
"$scratch/add_subdirectory/consumer"
"$scratch/add_subdirectory/sqlite_consumer"
"$scratch/add_subdirectory/redis_consumer"

echo "== packaging: meson subproject"
mkdir -p "$scratch/meson_project/subprojects"
cp "$here/meson_consumer/meson.build" "$scratch/meson_project/"
cp "$here/consumer.cpp" "$here/sqlite_consumer.cpp" "$here/redis_consumer.cpp" "$scratch/"
ln -s "$root" "$scratch/meson_project/subprojects/devgate"
meson setup "$scratch/meson_project/build" "$scratch/meson_project" >/dev/null
meson test -C "$scratch/meson_project/build" --print-errorlogs >/dev/null
"$scratch/meson_project/build/consumer"
"$scratch/meson_project/build/sqlite_consumer"
"$scratch/meson_project/build/redis_consumer"

echo "== packaging: pkg-config --cflags --libs devgate"
export PKG_CONFIG_PATH="$scratch/prefix/share/pkgconfig"
# shellcheck disable=SC2046 # pkg-config output is a list of flags
c++ -Wall -Wextra -Werror "$here/consumer.cpp" -o "$scratch/pkg_config_consumer" \
  $(pkg-config --cflags --libs devgate)
"$scratch/pkg_config_consumer"
# shellcheck disable=SC2046 # pkg-config output is a list of flags
c++ -Wall -Wextra -Werror "$here/sqlite_consumer.cpp" -o "$scratch/pkg_config_sqlite_consumer" \
  $(pkg-config --cflags --libs devgate-sqlite)
"$scratch/pkg_config_sqlite_consumer"
# shellcheck disable=SC2046 # pkg-config output is a list of flags
c++ -Wall -Wextra -Werror "$here/redis_consumer.cpp" -o "$scratch/pkg_config_redis_consumer" \
  $(pkg-config --cflags --libs devgate-redis)
"$scratch/pkg_config_redis_consumer"
echo "packaging: all four consumers built and ran, with the optional SQLite and Redis parts"
