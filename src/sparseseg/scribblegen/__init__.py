"""Generative data augmentation from scribbles (ScribbleGen, Schnell et al. 2023).

`adm` trains our ADM UNet conditioned on scribble maps and generates synthetic images from real
images and their scribbles (encode ratio, classifier-free guidance); `augment` trains the head on
scribbled pixels of real and synthetic images under several augmentation schemes.
"""
