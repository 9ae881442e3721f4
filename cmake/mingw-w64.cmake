# Cross-compiling ddp.h's programs for 64-bit Windows with mingw-w64, from
# Linux, and running them (ctest) under Wine:
#
#   cmake -B build-wine --toolchain cmake/mingw-w64.cmake
#   cmake --build build-wine -j2 && ctest --test-dir build-wine --output-on-failure
#
# Debian 12: apt-get install --no-install-recommends gcc-mingw-w64-x86-64
#            g++-mingw-w64-x86-64 wine wine64 libz-mingw-w64-dev
# CUDA is off (nvcc cannot cross-compile for Windows). Programs are linked
# statically (no libgcc, libstdc++ or winpthread DLLs to find under Wine).
# Tests run through cmake/wine-run.sh: a Wine prefix of the build tree's own
# (created on first use in <build>/wine), Wine's temporary files in /dev/shm,
# one persistent wineserver.
set(CMAKE_SYSTEM_NAME Windows)
set(CMAKE_SYSTEM_PROCESSOR x86_64)
set(DDP_MINGW_TRIPLE x86_64-w64-mingw32 CACHE STRING "mingw-w64 target triple (compiler prefix)")
set(CMAKE_C_COMPILER ${DDP_MINGW_TRIPLE}-gcc)
set(CMAKE_CXX_COMPILER ${DDP_MINGW_TRIPLE}-g++)
set(CMAKE_RC_COMPILER ${DDP_MINGW_TRIPLE}-windres)
set(CMAKE_FIND_ROOT_PATH /usr/${DDP_MINGW_TRIPLE})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)
set(CMAKE_EXE_LINKER_FLAGS_INIT "-static")
set(ZLIB_USE_STATIC_LIBS ON)
set(DDP_WITH_CUDA OFF CACHE STRING "CUDA targets: AUTO (when nvcc is found), ON or OFF")
find_program(DDP_WINE wine)
if(DDP_WINE)
  set(CMAKE_CROSSCOMPILING_EMULATOR ${CMAKE_CURRENT_LIST_DIR}/wine-run.sh --dir ${CMAKE_BINARY_DIR}/wine)
endif()
