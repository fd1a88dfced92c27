"""Pretrained models shipped with the package: ``<name>.safetensors`` + ``<name>.json`` pairs.

The files are data, not code: :mod:`equiformer.hub` documents the format, finds models here
by name (``equiformer.hub.available_models()``, ``equiformer predict --list-models``) and
loads them without unpickling anything. To add one, export a trained PropertyTask checkpoint::

    python -m equiformer.hub export runs/qm9_homo/best.ckpt --name qm9-equiformer-homo \\
        --metrics test_metrics.json --training training.json

which writes both files into this folder and checks that the exported model reproduces the
checkpoint's outputs. Models named ``<family>-<target>`` load together as
``Predictor.from_pretrained("<family>")``.
"""
