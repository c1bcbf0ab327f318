"""Model definitions, data and training. Every network here has torchvision's layout: a `features`
block of convolutions, an optional `avgpool`, and a `classifier` block, which is what
`export.convolutionalize` reads."""

from models.registry import ARCHS, ArchSpec, InputSpec, build, get_arch, list_archs

__all__ = ["ARCHS", "ArchSpec", "InputSpec", "build", "get_arch", "list_archs"]
