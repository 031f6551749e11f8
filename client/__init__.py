"""Client library and command-line tools for SurfShard."""
