# Finds ggml's headers for pymem's extension, or builds ggml from a source tree.
#
# Default: the headers of the libggml-python wheel (a build requirement). scikit-build-core
# puts its prefix on CMAKE_PREFIX_PATH and sets ggml_ROOT; on Debian-family hosts its
# package files live under lib64/, which CMake does not search by itself, and without a
# version request CMake may pick the exported ggmlConfig.cmake with a broken rpath.
#
# With -DPYMEM_GGML_SOURCE_DIR=<dir holding ggml's CMakeLists.txt> (for example
# llama.cpp's ggml/ directory, or a git submodule placed under vendor/), ggml is built from
# that tree with every GGML_* option given in CMAKE_ARGS (GGML_CUDA, GGML_METAL, ...), and
# its shared libraries are installed into pymem/_ggml/ so the wheel is self-contained.
#
# Output: PYMEM_GGML_INCLUDE_DIRS.

if(PYMEM_GGML_SOURCE_DIR)
    if(NOT EXISTS "${PYMEM_GGML_SOURCE_DIR}/CMakeLists.txt")
        message(FATAL_ERROR "PYMEM_GGML_SOURCE_DIR=${PYMEM_GGML_SOURCE_DIR} holds no CMakeLists.txt")
    endif()
    enable_language(CXX)
    set(BUILD_SHARED_LIBS ON CACHE BOOL "" FORCE)
    set(GGML_BUILD_TESTS OFF CACHE BOOL "" FORCE)
    set(GGML_BUILD_EXAMPLES OFF CACHE BOOL "" FORCE)
    set(GGML_NATIVE ON CACHE BOOL "")
    add_subdirectory("${PYMEM_GGML_SOURCE_DIR}" ggml-build EXCLUDE_FROM_ALL)
    set(PYMEM_GGML_INCLUDE_DIRS "${PYMEM_GGML_SOURCE_DIR}/include")
    # the extension still does not link ggml; pymem/_native.py loads these at import
    set(_pymem_ggml_targets ggml ggml-base)
    foreach(_t ggml-cpu ggml-cuda ggml-metal ggml-vulkan ggml-blas)
        if(TARGET ${_t})
            list(APPEND _pymem_ggml_targets ${_t})
        endif()
    endforeach()
    set_target_properties(${_pymem_ggml_targets} PROPERTIES INSTALL_RPATH "$ORIGIN")
    add_custom_target(pymem_ggml_libs ALL DEPENDS ${_pymem_ggml_targets})
    install(TARGETS ${_pymem_ggml_targets} LIBRARY DESTINATION pymem/_ggml RUNTIME DESTINATION pymem/_ggml)
    message(STATUS "pymem: building ggml from ${PYMEM_GGML_SOURCE_DIR} (${_pymem_ggml_targets})")
else()
    find_package(ggml 0.20 CONFIG REQUIRED
                 HINTS "${ggml_ROOT}/lib64/cmake/ggml" "${ggml_ROOT}/lib/cmake/ggml")
    get_target_property(PYMEM_GGML_INCLUDE_DIRS ggml::ggml INTERFACE_INCLUDE_DIRECTORIES)
    if(NOT PYMEM_GGML_INCLUDE_DIRS)
        get_filename_component(_ggml_prefix "${ggml_DIR}/../../.." ABSOLUTE)
        set(PYMEM_GGML_INCLUDE_DIRS "${_ggml_prefix}/include")
    endif()
    message(STATUS "pymem: compiling against ggml ${ggml_VERSION} headers in ${PYMEM_GGML_INCLUDE_DIRS}")
endif()
