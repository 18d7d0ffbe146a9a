// CCairnBuildInfo: the git commit the binary was built from.
//
// Why it exists: SwiftPM can pass a value from the manifest (Context.gitInformation) to C code
// as a define, but not to Swift. This one function carries it across.
#ifndef CCAIRN_BUILD_INFO_H
#define CCAIRN_BUILD_INFO_H

// "abc1234", "abc1234-dirty", or "unknown" outside a git checkout.
const char *cairn_build_commit(void);

#endif
