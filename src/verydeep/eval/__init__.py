"""eval: see docs/ARCHITECTURE.md."""
