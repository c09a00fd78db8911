# toolkit_find_ort_headers(<target-name>): set ORT_INCLUDE_DIR (cache) to the directory
# holding onnxruntime_cxx_api.h, for the op library and the C++ host example alike.
#
# Order: -DORT_INCLUDE_DIR, $ENV{ORT_INCLUDE_DIR}, /usr/include/onnxruntime, then
# Debian trixie's libonnxruntime-dev fetched (not installed) into the user cache by
# fetch_ort_headers.sh. The onnxruntime wheel ships no headers.
set(_toolkit_fetch_script "${CMAKE_CURRENT_LIST_DIR}/fetch_ort_headers.sh")

function(toolkit_find_ort_headers who)
  set(candidates)
  if(ORT_INCLUDE_DIR)
    list(APPEND candidates "${ORT_INCLUDE_DIR}")
  endif()
  if(DEFINED ENV{ORT_INCLUDE_DIR} AND NOT "$ENV{ORT_INCLUDE_DIR}" STREQUAL "")
    list(APPEND candidates "$ENV{ORT_INCLUDE_DIR}")
  endif()
  list(APPEND candidates "/usr/include/onnxruntime")

  set(found "")
  foreach(dir IN LISTS candidates)
    if(EXISTS "${dir}/onnxruntime_cxx_api.h")
      set(found "${dir}")
      break()
    endif()
  endforeach()

  if(NOT found AND NOT ORT_INCLUDE_DIR)
    if(DEFINED ENV{XDG_CACHE_HOME} AND NOT "$ENV{XDG_CACHE_HOME}" STREQUAL "")
      set(cache_root "$ENV{XDG_CACHE_HOME}")
    else()
      set(cache_root "$ENV{HOME}/.cache")
    endif()
    set(cache "${cache_root}/toolkit/ort-headers/1.21")
    if(NOT EXISTS "${cache}/include/onnxruntime/onnxruntime_cxx_api.h")
      message(STATUS "${who}: fetching ONNX Runtime headers into ${cache}")
      execute_process(COMMAND bash "${_toolkit_fetch_script}" "${cache}"
                      RESULT_VARIABLE rc ERROR_VARIABLE err)
      if(NOT rc EQUAL 0)
        message(STATUS "${who}: header fetch failed: ${err}")
      endif()
    endif()
    if(EXISTS "${cache}/include/onnxruntime/onnxruntime_cxx_api.h")
      set(found "${cache}/include/onnxruntime")
    endif()
  endif()

  if(NOT found)
    message(FATAL_ERROR
      "${who}: ONNX Runtime C/C++ headers not found (looked in: ${candidates}"
      " and the fetch cache). The onnxruntime wheel ships no headers. Fix: pass"
      " -DORT_INCLUDE_DIR=<dir containing onnxruntime_cxx_api.h> (or set the"
      " ORT_INCLUDE_DIR environment variable) pointing at an ONNX Runtime release's"
      " include/ directory, install libonnxruntime-dev, or allow network access so"
      " cmake/fetch_ort_headers.sh can download Debian's libonnxruntime-dev.")
  endif()
  set(ORT_INCLUDE_DIR "${found}" CACHE PATH "ONNX Runtime include directory" FORCE)
  message(STATUS "${who}: ONNX Runtime headers: ${found}")
endfunction()
