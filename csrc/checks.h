// Argument validation for the fastconv_cuda ops.
//
// Every failure message names the op, the argument, what was expected and what was
// actually passed, so a caller can fix the call without reading this code.
#pragma once

#include <c10/util/Exception.h>
#include <c10/util/StringUtil.h>

// FC_CHECK(cond, op, arg, expected, actual): `expected` and `actual` are anything
// c10::str can print; build composite descriptions with c10::str(...).
#define FC_CHECK(cond, op, arg, expected, actual)                                    \
  TORCH_CHECK((cond), op, ": argument '", arg, "' must be ", expected, ", but got ", \
              actual)

#define FC_CHECK_CUDA(op, t, arg) \
  FC_CHECK((t).is_cuda(), op, arg, "a CUDA tensor", c10::str("a tensor on ", (t).device()))

#define FC_CHECK_DIM(op, t, arg, d)                   \
  FC_CHECK((t).dim() == (d), op, arg, c10::str(d, "-D"), \
           c10::str((t).dim(), "-D with shape ", (t).sizes()))

#define FC_CHECK_SAME_DEVICE(op, t, arg, ref, ref_arg)                                   \
  FC_CHECK((t).device() == (ref).device(), op, arg,                                      \
           c10::str("on the same device as '", ref_arg, "' (", (ref).device(), ")"), \
           (t).device())
