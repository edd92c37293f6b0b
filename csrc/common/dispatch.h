// dtype dispatch used by every kernel: the four float types the ops accept.
#pragma once

#include <ATen/Dispatch.h>

// Inputs: float32, float64, float16, bfloat16.
#define OBA_DISPATCH_FLOATS(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, NAME, __VA_ARGS__)

// Outputs / accumulators: float32 or float64.
#define OBA_DISPATCH_OUT(TYPE, NAME, ...) AT_DISPATCH_FLOATING_TYPES(TYPE, NAME, __VA_ARGS__)
