# Locates ONNX Runtime's C API headers and defines FASTONNX_ORT_INCLUDE_DIR.
# Order: the FASTONNX_ORT_INCLUDE_DIR cache variable or environment variable; the project cache
# (.cache/ort-headers); else fetch them from Debian's libonnxruntime-dev into that cache.
set(FASTONNX_ORT_INCLUDE_DIR "$ENV{FASTONNX_ORT_INCLUDE_DIR}" CACHE PATH
    "Folder holding onnxruntime_c_api.h (fetched automatically when empty)")

if(FASTONNX_ORT_INCLUDE_DIR)
  if(NOT EXISTS "${FASTONNX_ORT_INCLUDE_DIR}/onnxruntime_c_api.h")
    message(FATAL_ERROR
      "FASTONNX_ORT_INCLUDE_DIR=${FASTONNX_ORT_INCLUDE_DIR} holds no onnxruntime_c_api.h. "
      "Point it at the include folder of an ONNX Runtime >= 1.16 release, or unset it to let "
      "the build fetch the headers from Debian's libonnxruntime-dev package.")
  endif()
else()
  set(_cache "${PROJECT_SOURCE_DIR}/.cache/ort-headers")
  if(NOT EXISTS "${_cache}/onnxruntime_c_api.h")
    message(STATUS "fastonnx: fetching ONNX Runtime headers into ${_cache}")
    execute_process(
      COMMAND bash "${CMAKE_CURRENT_LIST_DIR}/fetch_ort_headers.sh" "${_cache}"
      RESULT_VARIABLE _rc ERROR_VARIABLE _err)
    if(NOT _rc EQUAL 0 OR NOT EXISTS "${_cache}/onnxruntime_c_api.h")
      message(FATAL_ERROR
        "Could not fetch the ONNX Runtime headers (exit ${_rc}):\n${_err}\n"
        "Fix: set FASTONNX_ORT_INCLUDE_DIR to a folder holding onnxruntime_c_api.h and "
        "onnxruntime_cxx_api.h (any ONNX Runtime >= 1.16 release), e.g.\n"
        "  FASTONNX_ORT_INCLUDE_DIR=/path/to/onnxruntime/include pip install .")
    endif()
  endif()
  set(FASTONNX_ORT_INCLUDE_DIR "${_cache}")
endif()
message(STATUS "fastonnx: ONNX Runtime headers from ${FASTONNX_ORT_INCLUDE_DIR}")
