#pragma once

/// Major version of devgate (bumped on incompatible API changes).
#define DEVGATE_VERSION_MAJOR 0
/// Minor version of devgate (bumped on compatible additions).
#define DEVGATE_VERSION_MINOR 1
/// Patch version of devgate (bumped on fixes).
#define DEVGATE_VERSION_PATCH 0

#include <string_view>  // version_string

namespace devgate {

/// The library version as "major.minor.patch", matching the CMake and meson package version.
inline constexpr std::string_view version_string = "0.1.0";

}  // namespace devgate
