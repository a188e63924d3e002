# uncompctl end-to-end test (client/): the real uncompd (one rank, mpirun -np 2 --tp 2, and TLS
# when openssl is there) driven by every uncompctl command, error paths and exit codes included.
# Included from tests/e2e/CMakeLists.txt: include(${CMAKE_CURRENT_SOURCE_DIR}/client_tests.cmake)
# Run alone: ctest --test-dir build -R e2e_uncompctl --output-on-failure
if(TARGET uncompctl AND TARGET uncompd)
  set(UC_CTL_TEST_ENV
    OMPI_MCA_rmaps_base_oversubscribe=1
    OMPI_ALLOW_RUN_AS_ROOT=1
    OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1)
  add_test(NAME e2e_uncompctl
    COMMAND /usr/bin/python3 ${CMAKE_CURRENT_LIST_DIR}/test_uncompctl.py
            --uncompctl $<TARGET_FILE:uncompctl>
            --daemon $<TARGET_FILE:uncompd>
            --mpirun ${MPIEXEC_EXECUTABLE})
  set_tests_properties(e2e_uncompctl PROPERTIES
    LABELS e2e
    TIMEOUT 240
    SKIP_RETURN_CODE 77
    ENVIRONMENT "${UC_CTL_TEST_ENV}")
endif()
