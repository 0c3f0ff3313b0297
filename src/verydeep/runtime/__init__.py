"""Where and how a command runs: its processes (:mod:`.processes`, :mod:`.sharding`), device
(:mod:`.device`), precision (:mod:`.precision`), memory (:mod:`.memory`), RNG state (:mod:`.rng`),
progress (:mod:`.progress`), work done ahead of its consumer (:mod:`.ahead`) and the bounds on what a
user asks for (:mod:`.limits`)."""
