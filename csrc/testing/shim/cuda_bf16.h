// Harness stand-in for the CUDA toolkit header of the same name: everything lives in harness.h.
#pragma once
#include "../harness.h"
