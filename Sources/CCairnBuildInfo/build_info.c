#include "CCairnBuildInfo.h"

#ifndef CAIRN_BUILD_COMMIT
#define CAIRN_BUILD_COMMIT "unknown"
#endif

const char *cairn_build_commit(void) { return CAIRN_BUILD_COMMIT; }
