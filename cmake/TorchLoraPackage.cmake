# Install rules. Two layouts:
#  - a CMake prefix (default): lib/, include/, lib/cmake/TorchLora/
#  - the Python package (TORCHLORA_PYTHON_PACKAGE_LAYOUT=ON, used by setup.py): _C next to
#    lib/, include/ and share/cmake/TorchLora/ inside the torchlora package folder, so that
#    C++ programs can find_package(TorchLora) from a pip install (torchlora.cmake_prefix_path).
include(CMakePackageConfigHelpers)
include(GNUInstallDirs)

if(TORCHLORA_PYTHON_PACKAGE_LAYOUT)
  set(TORCHLORA_INSTALL_LIBDIR lib)
  set(TORCHLORA_INSTALL_INCLUDEDIR include)
  set(TORCHLORA_INSTALL_CMAKEDIR share/cmake/TorchLora)
  # torchlora/lib -> site-packages/torch/lib, else the torch it was built against (editable
  # and development trees). RUNPATH is not inherited: programs linking libtorchlora need it
  # to find libc10_cuda and friends.
  set_target_properties(torchlora PROPERTIES INSTALL_RPATH "$ORIGIN/../../torch/lib;${TORCH_ROOT}/lib")
  if(TORCHLORA_BUILD_PYTHON)
    install(TARGETS _C LIBRARY DESTINATION .)
  endif()
else()
  set(TORCHLORA_INSTALL_LIBDIR ${CMAKE_INSTALL_LIBDIR})
  set(TORCHLORA_INSTALL_INCLUDEDIR ${CMAKE_INSTALL_INCLUDEDIR})
  set(TORCHLORA_INSTALL_CMAKEDIR ${CMAKE_INSTALL_LIBDIR}/cmake/TorchLora)
  set_target_properties(torchlora PROPERTIES INSTALL_RPATH "${TORCH_ROOT}/lib")
endif()

install(TARGETS torchlora EXPORT TorchLoraTargets
  LIBRARY DESTINATION ${TORCHLORA_INSTALL_LIBDIR}
  ARCHIVE DESTINATION ${TORCHLORA_INSTALL_LIBDIR}
  RUNTIME DESTINATION ${TORCHLORA_INSTALL_LIBDIR}
  INCLUDES DESTINATION ${TORCHLORA_INSTALL_INCLUDEDIR})
install(DIRECTORY ${PROJECT_SOURCE_DIR}/csrc/torchlora/include/torchlora
  DESTINATION ${TORCHLORA_INSTALL_INCLUDEDIR})
install(EXPORT TorchLoraTargets NAMESPACE TorchLora:: DESTINATION ${TORCHLORA_INSTALL_CMAKEDIR})

configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/TorchLoraConfig.cmake.in
  ${PROJECT_BINARY_DIR}/TorchLoraConfig.cmake
  INSTALL_DESTINATION ${TORCHLORA_INSTALL_CMAKEDIR})
write_basic_package_version_file(${PROJECT_BINARY_DIR}/TorchLoraConfigVersion.cmake
  COMPATIBILITY SameMinorVersion)
# The config finds torch and nlohmann_json with the build's own modules.
install(FILES ${PROJECT_BINARY_DIR}/TorchLoraConfig.cmake ${PROJECT_BINARY_DIR}/TorchLoraConfigVersion.cmake
  ${PROJECT_SOURCE_DIR}/cmake/TorchLoraTorch.cmake ${PROJECT_SOURCE_DIR}/cmake/TorchLoraJson.cmake
  DESTINATION ${TORCHLORA_INSTALL_CMAKEDIR})
