# ctest driver for the three ways to consume fovea. Usage:
#   cmake -DMODE=<find_package|add_subdirectory|include_flags> -DSOURCE=<fovea source>
#         -DBINARY=<fovea build dir> -DWORK=<scratch dir> -DCXX=<compiler> -P build_and_run.cmake
function(run)
  execute_process(COMMAND ${ARGV} RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    string(REPLACE ";" " " cmd "${ARGV}")
    message(FATAL_ERROR "failed (${rc}): ${cmd}")
  endif()
endfunction()

file(REMOVE_RECURSE ${WORK})
file(MAKE_DIRECTORY ${WORK})
if(MODE STREQUAL "find_package")
  run(${CMAKE_COMMAND} --install ${BINARY} --prefix ${WORK}/prefix)
  # (at -O2, as the test suites: GCC 12 takes 2.3x as long over llama2c at -O3, 140 s)
  run(${CMAKE_COMMAND} -S ${SOURCE}/examples -B ${WORK}/build -DCMAKE_BUILD_TYPE=Release
      "-DCMAKE_CXX_FLAGS_RELEASE=-O2 -DNDEBUG" -DCMAKE_PREFIX_PATH=${WORK}/prefix
      -DCMAKE_CXX_COMPILER=${CXX})
  run(${CMAKE_COMMAND} --build ${WORK}/build --parallel 2)
  # serving_step exits 1 unless its paged steps equal per-sequence calls bit for bit.
  foreach(example basic_attention kv_cache_decode serving_step long_context_sparse custom_variant
                  tiny_transformer)
    run(${WORK}/build/${example})
  endforeach()
  run(${WORK}/build/train_tiny --steps 400)  # exits 1 below 95% held-out accuracy
  run(${WORK}/build/train_tiny --attention linear)  # through linear_attention_backward
  run(${WORK}/build/train_tiny --attention dma)  # through both dynamic-mask backwards
  set(model ${SOURCE}/../shared/models/stories260K.bin)  # the real checkpoint, when laid out
  if(EXISTS ${model})
    run(${WORK}/build/llama2c ${model} -n 64)
    run(${WORK}/build/llama2c ${model} -n 64 --kv bf16 --paged)
    run(${WORK}/build/llama2c ${model} -n 64 --kv int8 --paged)
  endif()
elseif(MODE STREQUAL "add_subdirectory")
  run(${CMAKE_COMMAND} -S ${SOURCE}/tests/consumers/add_subdirectory -B ${WORK}/build
      -DCMAKE_BUILD_TYPE=Release "-DCMAKE_CXX_FLAGS_RELEASE=-O2 -DNDEBUG"
      -DFOVEA_SOURCE_DIR=${SOURCE} -DCMAKE_CXX_COMPILER=${CXX})
  run(${CMAKE_COMMAND} --build ${WORK}/build)
  run(${WORK}/build/consumer)
elseif(MODE STREQUAL "include_flags")
  # The flags the README documents for plain -I use, plus -Wall -Wextra -Werror: every
  # family warning-clean, natively (and run), and for AVX-512 with BF16 and VNNI (compiled
  # only: this machine need not run it), unless native has them already; and for AVX2 at
  # -O3 (compiled only), where GCC's loop analysis warned of UB that -O2 did not see.
  execute_process(COMMAND ${CXX} -march=native -dM -E -x c++ /dev/null OUTPUT_VARIABLE macros)
  set(archs native)
  if(NOT macros MATCHES "__AVX512BF16__" OR NOT macros MATCHES "__AVX512VNNI__")
    list(APPEND archs sapphirerapids)
  endif()
  foreach(arch ${archs})
    run(${CXX} -std=c++20 -O2 -march=${arch} -fopenmp -Wall -Wextra -Werror -I${SOURCE}/include
        -isystem /usr/include/eigen3 ${SOURCE}/tests/consumers/every_family.cpp
        -o ${WORK}/every_family-${arch})
  endforeach()
  run(${CXX} -std=c++20 -O3 -march=x86-64-v3 -fopenmp -Wall -Wextra -Werror -I${SOURCE}/include
      -isystem /usr/include/eigen3 ${SOURCE}/tests/consumers/every_family.cpp
      -o ${WORK}/every_family-x86-64-v3-O3)
  run(${WORK}/every_family-native)
else()
  message(FATAL_ERROR "unknown MODE ${MODE}")
endif()
