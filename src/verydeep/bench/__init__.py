"""``verydeep bench``: speed against the hardware's limit, measured in one run (the paper's Sec. 3.3 reports its
training's speed; this measures ours).

On the machine at hand, in rounds that alternate between the contenders (medians reported, since
shared machines are noisy; a ratio or roofline share is the median of the rounds' own, each
between measurements taken moments apart): the roofline of each precision a contender runs in (the
fastest rate the machine reaches in it: large ``torch.mm`` and the convolutions of the net's own
shapes, :mod:`.roofline`, the kernel that set it named), the kernel ceiling (:mod:`.ceiling`: the net's
conv and FC kernels timed alone and summed, so the share of the roofline its kernels allow is known),
torchvision's VGG in a plain fp32
loop (NCHW, no autocast) as the reference, torchvision's VGG as a user at their best runs it
(:mod:`.peer`: autocast, channels_last, the fused update, eager or compiled, whichever is
faster here), our training step and inference as ``verydeep train`` and ``verydeep eval`` run them
(the trainer's own step, autocast at the precision ``auto`` picks, channels_last; evaluation's net
with its weights held in that precision), the trainer end to end on JPEGs (data loading included,
in steady state: from the trainer's own step records, leaving out a step for each loader process,
and one, after the loader starts, since the batches its processes made while the first step waited
are not the steady state), and dense against 150-crop evaluation (Q = 3 scales) per image. FLOPs
per image are counted from the model (2 per multiply-accumulate of the conv and linear layers; a
training step is taken as 3 forward passes), so each rate is also a share of its precision's
roofline, and the roofline over torchvision's rate is the ratio a net at 100% of the roofline
would reach.

    command.py    the command and its run: every contender in alternating rounds
    settings.py   what a run measures, the defaults of each kind of device, the test scales
    data.py       the bench's images: a dataset's class folders linked, else generated JPEGs
    measure.py    a rate over steps, rounds that alternate, a net's multiply-accumulates
    roofline.py   the roofline of each precision: the fastest matrix product or convolution
    ceiling.py    the kernel ceiling: each layer's kernels alone, summed (the best a step of them can do)
    reference.py  torchvision's VGG in plain fp32, and built for its best
    peer.py       torchvision's VGG at its best: autocast, channels_last, fused update, eager or compiled
    ours.py       our contenders: the trainer's step, inference, end to end, dense vs multi-crop
    summary.py    the result: medians, paired ratios, roofline shares, the machine, the table
"""
