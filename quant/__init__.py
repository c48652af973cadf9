"""Fixed-point formats, the bit-exact golden model, hardware approximations, reorder schedules."""
