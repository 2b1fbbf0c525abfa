"""The method layer: self-training methods for unsupervised domain adaptation, one module each.

* ``dacs``: DACS (Tranheden et al., WACV 2021): EMA teacher, ClassMix, confidence-weighted loss.
* ``fda``: FDA (Yang and Soatto, CVPR 2020): source images with a target image's low-frequency amplitudes.
* ``entropy``: ADVENT's direct entropy minimisation (Vu et al., CVPR 2019).
* ``rare_class_sampling``: DAFormer's rare-class sampling (Hoyer et al., CVPR 2022).
* ``step``: their flags and the training step that combines them with the adversarial step.

Imports flow one way: the scripts import ``uda``, ``uda`` imports ``utils``, ``model`` and ``dataset``;
nothing under those imports ``uda``.
"""
