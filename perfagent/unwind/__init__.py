"""User-stack unwinding over the stack copies the kernel samples."""
