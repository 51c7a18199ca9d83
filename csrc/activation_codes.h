// The activation codes of the ops' `int activation` arguments, shared with the Python side
// (fastconv/activations.py's ACTIVATION_CODES). Host and device code include this; the
// device formulas are in activations.cuh, the host check in checks.h.
#pragma once

namespace fastconv {

enum ActivationCode : int {
  kActNone = 0,
  kActReLU = 1,
  kActReLU6 = 2,
  kActSiLU = 3,
  kActHardSwish = 4,
  kActCount = 5,
};

}  // namespace fastconv
