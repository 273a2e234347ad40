"""Hot operations: the reference math and fast kernels side by side, one dispatch point per op."""
