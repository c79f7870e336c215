"""One module per op family: Triton kernels, launchers, torch reference, op registration and
the public functions, in that order."""
