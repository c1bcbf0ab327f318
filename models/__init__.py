"""Model definitions, data and training. Every network here has torchvision's layout: a `features`
block of convolutions, an optional `avgpool`, and a `classifier` block, which is what
`export.convolutionalize` reads. The registry is `models.registry`; importing this package alone does
not import torch (the load tests use `models.pages` without it)."""
