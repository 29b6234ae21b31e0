"""The unsupervised cell-type model (method section 2): networks, crop streaming,
augmentation, the WGAN-GP + InfoGAN update steps, checkpoints, the saved model, and the
hand-made-feature baseline.  The only subpackage that imports torch.
"""
