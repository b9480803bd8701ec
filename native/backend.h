// backend: starting llama.cpp and libmtmd once per process, keeping them quiet unless asked, and
// remembering their last error so that a failed load can say why in one line; plus the check
// that an mmproj is a LLaVA-style vision projector before libmtmd loads it.
#pragma once

#include <string>

namespace vhr {

// llama_backend_init and the log callbacks, once; verbose lets the logs through to stderr.
void init_backend_once(bool verbose);

// The last error llama.cpp / libmtmd logged (one line), cleared.
std::string take_last_error();

// Throws std::runtime_error unless path is a GGUF with architecture "clip" and a LLaVA-style
// projector (mlp, mlp_norm, ldp, ldpv2).
void check_mmproj(const std::string & path);

}  // namespace vhr
