// libFuzzer's entry point for every Cairn fuzz target (docs/fuzzing.md). Why C: libFuzzer
// brings its own `main`, and SwiftPM renames a Swift executable's entry point in a way that
// clashes with it; a C executable gets no such treatment. The harnesses are Swift
// (fuzz/CairnFuzz); CAIRN_FUZZ_TARGET names the one this process runs.
#include <stddef.h>
#include <stdint.h>

// CairnFuzz's @_cdecl functions.
void cairn_fuzz_initialize(void);
void cairn_fuzz_one_input(const uint8_t *data, size_t size);

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    cairn_fuzz_initialize();
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    cairn_fuzz_one_input(data, size);
    return 0;
}
