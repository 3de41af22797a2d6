# fovea's dependencies, shared by the build tree and the installed package config.
include(CMakeFindDependencyMacro)
find_dependency(Eigen3 3.4 NO_MODULE)
# Debian's xsimdTargets.cmake names an `xtl` link dependency that the package does not
# install: provide an empty target so that linking xsimd works.
if(NOT TARGET xtl)
  add_library(xtl INTERFACE IMPORTED)
endif()
find_dependency(xsimd 8)
if(NOT DEFINED FOVEA_USE_OPENMP OR FOVEA_USE_OPENMP)
  find_package(OpenMP QUIET COMPONENTS CXX)
endif()
