"""Readers of the published weights' foreign formats (PAPER.md Sec. 8), each into torchvision's state dict keys,
which are ours: torchvision's own files, the authors' Caffe models, Keras' HDF5 files."""
