# ddpInstall.cmake - install rules (included by the top-level CMakeLists.txt when DDP_INSTALL).
#
#   <prefix>/include/ddp.h dp.h ddp_kernels.cuh      #include "ddp.h" or <ddp.h>
#   <prefix>/share/cmake/ddp/                        find_package(ddp 0.2 CONFIG)
#       ddpConfig.cmake ddpConfigVersion.cmake ddpTargets.cmake FindNCCL.cmake
#   <prefix>/share/pkgconfig/ddp.pc                  pkg-config --cflags --libs ddp
#   <prefix>/bin/ddprun                              the local launcher (when built)
#
# The library is headers only: nothing here depends on the architecture, so the
# package files go to share/. Nothing installed names a path of the build machine:
# the CMake files locate the prefix from their own place, ddp.pc from ${pcfiledir},
# and CUDA/NCCL are looked for on the consumer's machine when it asks for ddp::cuda.
include(CMakePackageConfigHelpers)

set(DDP_INSTALL_CMAKEDIR "${CMAKE_INSTALL_DATADIR}/cmake/ddp" CACHE STRING
    "Where the CMake package files go, relative to the prefix")
set(DDP_INSTALL_PKGCONFIGDIR "${CMAKE_INSTALL_DATADIR}/pkgconfig" CACHE STRING
    "Where ddp.pc goes, relative to the prefix")
mark_as_advanced(DDP_INSTALL_CMAKEDIR DDP_INSTALL_PKGCONFIGDIR)

install(FILES ${PROJECT_SOURCE_DIR}/ddp.h ${PROJECT_SOURCE_DIR}/dp.h ${PROJECT_SOURCE_DIR}/ddp_kernels.cuh
        DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})

install(TARGETS ddp EXPORT ddpTargets)
if(TARGET ddprun)
  install(TARGETS ddprun EXPORT ddpTargets RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
endif()
install(EXPORT ddpTargets NAMESPACE ddp:: DESTINATION ${DDP_INSTALL_CMAKEDIR})

configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/ddpConfig.cmake.in
    ${PROJECT_BINARY_DIR}/ddpConfig.cmake
    INSTALL_DESTINATION ${DDP_INSTALL_CMAKEDIR}
    NO_SET_AND_CHECK_MACRO)
# Before 1.0 a new minor version may break the API (CHANGELOG.md): a request
# for 0.2 accepts 0.2.x only; from 1.0 on, the same major version.
if(PROJECT_VERSION_MAJOR EQUAL 0)
  set(_ddp_compat SameMinorVersion)
else()
  set(_ddp_compat SameMajorVersion)
endif()
write_basic_package_version_file(${PROJECT_BINARY_DIR}/ddpConfigVersion.cmake
    VERSION ${PROJECT_VERSION} COMPATIBILITY ${_ddp_compat} ARCH_INDEPENDENT)
install(FILES ${PROJECT_BINARY_DIR}/ddpConfig.cmake ${PROJECT_BINARY_DIR}/ddpConfigVersion.cmake
              ${PROJECT_SOURCE_DIR}/cmake/FindNCCL.cmake
        DESTINATION ${DDP_INSTALL_CMAKEDIR})

# ddp.pc: relocatable (the prefix is found from the file's own directory)
if(IS_ABSOLUTE "${DDP_INSTALL_PKGCONFIGDIR}" OR IS_ABSOLUTE "${CMAKE_INSTALL_INCLUDEDIR}")
  set(DDP_PC_PREFIX "${CMAKE_INSTALL_PREFIX}")
else()
  file(RELATIVE_PATH _ddp_up "/p/${DDP_INSTALL_PKGCONFIGDIR}" "/p")
  string(REGEX REPLACE "/$" "" _ddp_up "${_ddp_up}")
  set(DDP_PC_PREFIX "\${pcfiledir}/${_ddp_up}")
endif()
if(IS_ABSOLUTE "${CMAKE_INSTALL_INCLUDEDIR}")
  set(DDP_PC_INCLUDEDIR "${CMAKE_INSTALL_INCLUDEDIR}")
else()
  set(DDP_PC_INCLUDEDIR "\${prefix}/${CMAKE_INSTALL_INCLUDEDIR}")
endif()
# what the implementation TU links (ddp.h's LINK LINES)
set(DDP_PC_LIBS "-lpthread -lm")
if(CMAKE_SYSTEM_NAME STREQUAL "Linux")
  set(DDP_PC_LIBS "-lpthread -lrt -lm")
endif()
configure_file(${PROJECT_SOURCE_DIR}/cmake/ddp.pc.in ${PROJECT_BINARY_DIR}/ddp.pc @ONLY)
install(FILES ${PROJECT_BINARY_DIR}/ddp.pc DESTINATION ${DDP_INSTALL_PKGCONFIGDIR})
