"""nn: see docs/ARCHITECTURE.md."""
