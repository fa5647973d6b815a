"""Runtime harnesses: exported artifacts -> latency and memory under emulated phone CPUs."""
