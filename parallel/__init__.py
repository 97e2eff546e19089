"""Device mesh, degree validation and one apply_* function per parallel technique."""
