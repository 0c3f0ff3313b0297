"""Nets in and out: any source of weights read into a net (:func:`load`), checkpoints, exports."""
