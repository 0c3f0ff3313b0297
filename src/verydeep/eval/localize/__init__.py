"""Localisation (Appendix A): nets that regress an object's box, and the ILSVRC localisation error.

The net is a classification net whose last FC layer predicts a box (centre x, centre y, width,
height, in units of the crop side: :func:`verydeep.data.boxes.encode`): one box for all classes
(single-class regression, SCR, 4 outputs) or one per class (per-class regression, PCR, 4 per
class). :class:`~verydeep.eval.localize.task.Localisation` is its :class:`~verydeep.nn.tasks.Task`: a
Euclidean loss on the ground-truth class's box, trained by :mod:`verydeep.train` from a classification
net (the last layer random), and validated by the localisation error of protocol 1.

- Protocol 1 (Table 8): the box of the central crop, for the ground-truth class; an image is
  wrong when its box has IoU <= 0.5 with every ground-truth box.
- Protocol 2 (Table 9): the net applied densely to the whole image at one or more scales, a box
  per location (and class) for each of a classification net's top classes, scored by that net's
  posterior of the class at the box's location, merged greedily as in OverFeat (scores summed),
  the best-scored box kept; an image is wrong unless one of its top-5 (class, box) predictions has
  the right class and IoU > 0.5 with one of that class's boxes. Several nets: the union of their
  boxes is merged. Images of the same size go through the nets in batches.

Both protocols also score two boxes that ignore the image: the whole image, and the mean training
box (the centre prior); in protocol 2 each is paired with the classifier's top-5 classes.
``localize train`` records the boxes it read, and the data it read them for, in the run's
``recipe.json`` (``boxes``, ``boxes_data``), which ``localize eval`` reads when neither ``--boxes`` nor
``DATA/boxes.txt`` is there and the file is of ``DATA`` (under it, or read for it); it refuses another
dataset's boxes, and names the boxes file it used in its table and JSON.

Modules, each one job: ``scoring`` (the ILSVRC criterion, greedy merging), ``prior`` (the centre
prior), ``task`` (the box regression task), ``center`` (protocol 1, Table 8), ``dense_nets`` (the
nets in dense form, their boxes and guesses), ``dense`` (protocol 2, Table 9), ``train`` (``localize
train``), ``predict`` (``localize predict``), ``command`` (the ``localize`` command, ``localize eval``).
"""
