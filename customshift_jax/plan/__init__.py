"""Planning for TPU pods on a CPU machine: the real entry points compiled by XLA:TPU for any slice (libtpu's
topology descriptions), read for per-chip memory, FLOPs, collectives and a roofline (`customshift plan`)."""
