# check_versions.cmake - the version is written in several places; they must agree.
#
#   cmake -DSOURCE_DIR=<repo> -DPROJECT_VERSION=<x.y.z> [-DCONFIG_VERSION_FILE=f] [-DPC_FILE=f] -P check_versions.cmake
#
# Reads the version from ddp.h's DDP_VERSION_MAJOR/MINOR/PATCH and compares it with:
# DDP_VERSION in ddp.h, the first line of ddp.h, dp.h and ddp_kernels.cuh, the
# DDP_KERNELS_VERSION_* macros, the CMake project's VERSION, the first "## " heading of
# CHANGELOG.md, and each generated package file given (ddpConfigVersion.cmake, ddp.pc).
# Prints every disagreement, then fails if there was one.
cmake_minimum_required(VERSION 3.18)
set(errors 0)
function(mismatch what found)
  message(SEND_ERROR "version mismatch: ${what} says '${found}', ddp.h's DDP_VERSION_MAJOR/MINOR/PATCH say '${want}'")
  math(EXPR n "${errors} + 1")
  set(errors ${n} PARENT_SCOPE)
endfunction()

file(READ "${SOURCE_DIR}/ddp.h" ddp_h)
foreach(part MAJOR MINOR PATCH)
  if(NOT ddp_h MATCHES "#define DDP_VERSION_${part} ([0-9]+)")
    message(FATAL_ERROR "ddp.h has no '#define DDP_VERSION_${part} <number>'")
  endif()
  set(v_${part} "${CMAKE_MATCH_1}")
endforeach()
set(want "${v_MAJOR}.${v_MINOR}.${v_PATCH}")

if(NOT ddp_h MATCHES "#define DDP_VERSION \"([^\"]*)\"")
  mismatch("ddp.h's DDP_VERSION" "(missing)")
elseif(NOT CMAKE_MATCH_1 STREQUAL want)
  mismatch("ddp.h's DDP_VERSION" "${CMAKE_MATCH_1}")
endif()

foreach(f ddp.h dp.h ddp_kernels.cuh)
  file(STRINGS "${SOURCE_DIR}/${f}" first LIMIT_COUNT 1)
  string(REGEX MATCH "^/\\* ${f} - v([0-9.]+) - " m "${first}")
  if(NOT CMAKE_MATCH_1 STREQUAL want)
    mismatch("the first line of ${f} ('${first}')" "${CMAKE_MATCH_1}")
  endif()
endforeach()

file(READ "${SOURCE_DIR}/ddp_kernels.cuh" kern)
set(kv "")
foreach(part MAJOR MINOR PATCH)
  if(kern MATCHES "#define DDP_KERNELS_VERSION_${part} ([0-9]+)")
    list(APPEND kv "${CMAKE_MATCH_1}")
  else()
    list(APPEND kv "?")
  endif()
endforeach()
string(REPLACE ";" "." kv "${kv}")
if(NOT kv STREQUAL want)
  mismatch("ddp_kernels.cuh's DDP_KERNELS_VERSION_*" "${kv}")
endif()

if(NOT PROJECT_VERSION STREQUAL want)
  mismatch("CMakeLists.txt's project(VERSION)" "${PROJECT_VERSION}")
endif()

file(STRINGS "${SOURCE_DIR}/CHANGELOG.md" heads REGEX "^## ")
list(GET heads 0 head)
if(NOT head MATCHES "^## ([0-9.]+)" OR NOT CMAKE_MATCH_1 STREQUAL want)
  mismatch("CHANGELOG.md's first heading ('${head}')" "${CMAKE_MATCH_1}")
endif()

foreach(f ${CONFIG_VERSION_FILE} ${PC_FILE})
  if(NOT EXISTS "${f}")
    mismatch("package file ${f}" "(missing)")
    continue()
  endif()
  file(READ "${f}" text)
  if(f MATCHES "\\.pc$")
    string(REGEX MATCH "\nVersion: ([^\n]*)" m "${text}")
  else()
    string(REGEX MATCH "set\\(PACKAGE_VERSION \"([^\"]*)\"\\)" m "${text}")
  endif()
  if(NOT CMAKE_MATCH_1 STREQUAL want)
    mismatch("${f}" "${CMAKE_MATCH_1}")
  endif()
endforeach()

if(errors EQUAL 0)
  message(STATUS "versions agree: ${want}")
endif()
