// pyext._C: importing it runs the TORCH_LIBRARY registrations of every op in
// csrc/; the ops are then reached through torch.ops.pyext.*. Nothing is bound
// through pybind11 beyond the module itself.
#include <pybind11/pybind11.h>

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyext CUDA kernels, registered with the torch dispatcher (torch.ops.pyext)";
}
