"""The command-line programs: `nfnets-train`, `nfnets-predict`, `nfnets-convert`.

Each parses its arguments, calls the library, and turns a user's mistake
into one `PROG: error: ...` line and exit status 2 (`errors`). They are the
only place that changes process-wide settings (`cpu.malloc.tune`, opt-in),
before JAX starts.
"""
