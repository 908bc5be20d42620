"""The training program: the ``snclr`` command and everything it needs to pretrain, evaluate
and compare runs on folders of images.

The library (:mod:`snclr`, :mod:`snclr.ops`, ...) never imports from here.
"""
